"""Verifying an announced version before a worker serves it: the one check for every path.

`verify_update` is what a running worker does with an announcement and what a worker does at
start-up: authenticity and freshness (`check_authentic`), then the version is resolved in the
worker's own registry (never a path from the wire), loaded and checked (sha256 of manifest and
weights, tensor names and shapes, finite values), compared with the announced architecture, and
checked to serve the running model's task with a usable vocabulary and label set. It never
touches asyncio, so it may run in a thread.

Example::

    verified = verify_update(update, key=key, registry=registry, current=running_manifest,
                             topic=topic, after_seq=highest_seen)
    # swap in verified.model, applying verified.policy (verified.note says why it changed)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stream_rnn.model.exceptions import WeightsError
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.announce import (
    UPDATES_TOPIC,
    ModelUpdate,
    Policy,
    architecture_summary,
    check_authentic,
)
from stream_rnn.registry.checkpoint import Manifest, load_checkpoint, load_verified
from stream_rnn.registry.exceptions import (
    CheckpointError,
    RegistryError,
    RejectReason,
    UpdateRejected,
)
from stream_rnn.registry.keys import UpdateKey
from stream_rnn.registry.versions import Registry

__all__ = ["VerifiedUpdate", "load_version", "verify_update"]


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update that passed `verify_update`: the loaded model and the policy to apply.

    ``policy`` is the effective one; ``note`` says why it differs from the requested policy
    (None when it does not).
    """

    model: RecurrentModel
    manifest: Manifest
    update: ModelUpdate
    policy: Policy
    note: str | None = None


def verify_update(
    update: ModelUpdate,
    *,
    key: bytes | UpdateKey | None,
    registry: Registry | Path,
    current: Manifest | None,
    topic: str = UPDATES_TOPIC,
    allow_unsigned: bool = False,
    after_seq: int = 0,
    device: str | torch.device = "cpu",
) -> VerifiedUpdate:
    """Check ``update`` and load the version it names from ``registry``; `UpdateRejected`.

    ``current`` is the running model (None at start-up: no task to keep). ``after_seq`` is the
    highest sequence number already seen (anything at or below it is ``stale``).
    """
    reg = registry if isinstance(registry, Registry) else Registry(Path(registry))
    try:
        registry_id = reg.identity()
    except (RegistryError, OSError) as exc:
        raise UpdateRejected(reason="unreadable", detail=f"registry {reg.root}: {exc}") from exc
    check_authentic(
        update,
        key=key,
        registry_id=registry_id,
        topic=topic,
        allow_unsigned=allow_unsigned,
        after_seq=after_seq,
    )
    model, manifest = _load_announced(reg, update, device)
    summary = architecture_summary(manifest)
    if summary != update.architecture:
        raise UpdateRejected(
            reason="checksum",
            detail=f"the announced architecture of {update.version} differs from its "
            f"manifest's ({_differences(update.architecture, summary)}); re-publish it",
        )
    check_servable(manifest, current)
    if current is None:
        return VerifiedUpdate(model, manifest, update, update.policy)
    policy, note = _effective_policy(update.policy, summary, current)
    return VerifiedUpdate(model=model, manifest=manifest, update=update, policy=policy, note=note)


def load_version(
    registry: Registry, version: str, *, device: str | torch.device = "cpu"
) -> tuple[RecurrentModel, Manifest]:
    """Load and check a registry version without an announcement (start-up fallback):
    sha256 of the weights, names and shapes, finite values, a servable task; `UpdateRejected`."""
    try:
        where = registry.path(version)
        model, manifest = load_checkpoint(where, device=device)
    except RegistryError as exc:
        reason = _reason_of(exc) if isinstance(exc, CheckpointError) else "unreadable"
        raise UpdateRejected(reason=reason, detail=str(exc)) from exc
    check_servable(manifest, None)
    return model, manifest


def _load_announced(
    reg: Registry, update: ModelUpdate, device: str | torch.device
) -> tuple[RecurrentModel, Manifest]:
    try:
        where = reg.path(update.version)  # validates the id; only this worker's registry
    except RegistryError as exc:
        raise UpdateRejected(reason="unreadable", detail=str(exc)) from exc
    try:
        # one read: the manifest's and weights' bytes are hashed, checked against the
        # announcement and loaded from those same bytes (no file is opened twice)
        found = load_verified(
            where,
            device=device,
            expect_manifest_sha256=update.manifest_sha256,
            expect_weights_sha256=update.weights_sha256,
        )
    except CheckpointError as exc:
        raise UpdateRejected(reason=_reason_of(exc), detail=str(exc)) from exc
    model, manifest = found.model, found.manifest
    if manifest.weights_sha256 != update.weights_sha256 or manifest.version != update.version:
        raise UpdateRejected(
            reason="checksum",
            detail=f"{where} holds version {manifest.version} with weights sha256 "
            f"{manifest.weights_sha256[:12]}…, not the announced {update.version} with "
            f"{update.weights_sha256[:12]}…",
        )
    return model, manifest


def _reason_of(exc: CheckpointError) -> RejectReason:
    # load_checkpoint raises CheckpointError for everything: tensor checks come wrapped around
    # a WeightsError (finiteness, or names/shapes/dtype), a hash mismatch in its own words, and
    # the rest (missing weights, unreadable file, invalid model config) is unreadable.
    text = str(exc)
    if isinstance(exc.__cause__, WeightsError):
        return "non_finite" if "non-finite" in text else "shapes"
    if "does not match the manifest" in text:
        return "checksum"
    return "unreadable"


def check_servable(manifest: Manifest, current: Manifest | None) -> None:
    """`UpdateRejected` ``incompatible`` unless ``manifest`` can be streamed (and serves the
    task of ``current``, when there is a running model)."""
    new = architecture_summary(manifest)

    def refuse(detail: str) -> UpdateRejected:
        return UpdateRejected(reason="incompatible", detail=f"update {manifest.version}: {detail}")

    if current is not None and new["task"] != architecture_summary(current)["task"]:
        raise refuse(
            f"is a {new['task']} model but this worker serves {current.model_config.get('task')} "
            f"({current.version}); a worker cannot change task: start workers for the new task "
            "on their own topics"
        )
    if new["bidirectional"]:
        raise refuse("is bidirectional and cannot be streamed (it needs future tokens)")
    itos = manifest.vocab.get("itos") if isinstance(manifest.vocab, dict) else None
    if not isinstance(itos, list) or len(itos) != new["vocab_size"]:
        size = len(itos) if isinstance(itos, list) else "no"
        raise refuse(f"its vocabulary has {size} tokens but the model has {new['vocab_size']}")
    if new["task"] in ("classify", "tag"):
        labels = new["labels"]
        if (
            not isinstance(labels, list)
            or len(labels) != new["num_labels"]
            or len(set(labels)) != len(labels)
        ):
            raise refuse(
                f"its labels {labels!r} cannot be mapped onto the model's {new['num_labels']} "
                "outputs (the worker needs one distinct label name per output); re-export the "
                "checkpoint with its label set"
            )


def _effective_policy(
    requested: Policy, new: dict[str, Any], current: Manifest
) -> tuple[Policy, str | None]:
    if requested != "keep":
        return requested, None
    cur = architecture_summary(current)
    diff = _differences(
        {k: v for k, v in cur.items() if k != "labels"},
        {k: v for k, v in new.items() if k != "labels"},
    )
    if not diff:
        return "keep", None
    return "rewarm", (
        f"policy keep needs the architecture and vocabulary of the running model "
        f"{current.version}; {diff}, so the states are rewarmed instead"
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            if name == "vocab_sha256":
                parts.append("the vocabulary differs")
            elif name == "labels":
                parts.append("the labels differ")
            else:
                parts.append(f"{name} {old.get(name)!r} -> {new.get(name)!r}")
    return ", ".join(parts)
