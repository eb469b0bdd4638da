"""Checkpoints: a directory with ``weights.safetensors`` and ``manifest.json``.

Weights are data, never code: tensors go through safetensors, everything else through JSON,
and nothing is ever unpickled. Loading rebuilds the network from the manifest's own model
config (never from the caller's flags) and refuses a checkpoint whose weights file does not
match the recorded sha256, lacks a tensor, has a wrong shape or holds a non-finite value.

Each file is read once (`stream_rnn.registry.safe_read`: no symbolic links, regular files only,
size-capped), and the manifest and tensors are parsed from the very bytes that were hashed:
nothing can swap a file between its check and its load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from stream_rnn import __version__
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.exceptions import ModelConfigError, WeightsError
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.exceptions import CheckpointError
from stream_rnn.registry.files import atomic_write
from stream_rnn.registry.safe_read import open_directory, read_file_once

__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "Manifest",
    "VerifiedCheckpoint",
    "atomic_write",
    "load_checkpoint",
    "load_verified",
    "read_manifest",
    "read_manifest_with_sha256",
    "save_checkpoint",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few KiB; its vocabulary may be large
MAX_WEIGHTS_BYTES = 4 << 30


@dataclass
class Manifest:
    """What ``manifest.json`` holds next to the weights."""

    model_config: dict[str, Any]
    vocab: dict[str, Any]
    weights_sha256: str
    version: str
    labels: list[str] | None = None
    parent_version: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    format_version: int = FORMAT_VERSION
    stream_rnn_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "stream_rnn_version": self.stream_rnn_version,
            "weights_sha256": self.weights_sha256,
            "model_config": self.model_config,
            "vocab": self.vocab,
            "labels": self.labels,
            "training": self.training,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> Manifest:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: manifest must be a JSON object")
        fmt = data.get("format_version")
        if fmt != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: manifest format_version {fmt!r} is not supported (this stream_rnn "
                f"reads {FORMAT_VERSION}); upgrade stream_rnn or re-export the checkpoint"
            )
        required = ("model_config", "vocab", "weights_sha256", "version")
        missing = [k for k in required if k not in data]
        if missing:
            raise CheckpointError(f"{where}: manifest lacks {missing}; the checkpoint is damaged")
        return cls(
            model_config=data["model_config"],
            vocab=data["vocab"],
            weights_sha256=str(data["weights_sha256"]),
            version=str(data["version"]),
            labels=data.get("labels"),
            parent_version=data.get("parent_version"),
            training=data.get("training") or {},
            metrics=data.get("metrics") or {},
            created_at=float(data.get("created_at") or 0.0),
            format_version=int(fmt),
            stream_rnn_version=str(data.get("stream_rnn_version", "")),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | Path,
    model: RecurrentModel,
    *,
    vocab: dict[str, Any],
    labels: list[str] | None = None,
    parent_version: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``model`` as a checkpoint directory and return its manifest.

    The version id is derived from the weights' sha256, so identical weights share an id.

    Example::

        manifest = save_checkpoint("runs/m1", model, vocab=vocab.to_dict(), metrics={"acc": .9})
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (tied weights): store independent copies;
    # loading re-ties them through the module structure.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".weights.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        digest = sha256_file(Path(tmp))
        os.replace(tmp, out / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = Manifest(
        model_config=model.config.to_dict(),
        vocab=vocab,
        weights_sha256=digest,
        version=f"m-{digest[:16]}",
        labels=list(labels) if labels is not None else None,
        parent_version=parent_version,
        training=training or {},
        metrics=metrics or {},
        created_at=time.time(),
    )
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False, allow_nan=False)
    atomic_write(out / MANIFEST_FILE, text.encode() + b"\n")
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the checkpoint in ``directory`` (read once, size-capped, no links)."""
    return _parse_manifest(Path(directory), _read_manifest_bytes(Path(directory)))


def read_manifest_with_sha256(directory: str | Path) -> tuple[Manifest, str]:
    """The manifest of ``directory`` and the sha256 of the very bytes it was parsed from (one
    read, size-capped, no links): what an announcement of this version must carry.

    Example::

        manifest, manifest_sha256 = read_manifest_with_sha256(registry.path(version))
    """
    raw = _read_manifest_bytes(Path(directory))
    return _parse_manifest(Path(directory), raw), hashlib.sha256(raw).hexdigest()


def _read_manifest_bytes(where: Path, dir_fd: int | None = None) -> bytes:
    try:
        return read_file_once(where, MANIFEST_FILE, limit=MAX_MANIFEST_BYTES, dir_fd=dir_fd)
    except CheckpointError as exc:
        if "is missing" in str(exc) or "does not exist" in str(exc):
            raise CheckpointError(
                f"{where} is not a checkpoint: {MANIFEST_FILE} is missing "
                "(train one with `stream-rnn train --out DIR`)"
            ) from None
        raise


def _parse_manifest(where: Path, raw: bytes) -> Manifest:
    path = where / MANIFEST_FILE
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from exc
    return Manifest.from_dict(data, path)


def load_weights_into(model: RecurrentModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model`` after checking names, shapes, dtypes and finiteness."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit the model config: missing tensors {missing}, unexpected "
            f"tensors {unexpected}; the weights file and manifest come from different models"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(got.shape)}, the model config needs "
                f"{tuple(ref.shape)}"
            )
        if not got.is_floating_point():
            raise WeightsError(f"tensor {name!r} has dtype {got.dtype}; weights must be floats")
        if not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise WeightsError(
                f"tensor {name!r} holds {bad} non-finite values (NaN/inf); refusing to load "
                "weights that would poison every prediction — retrain or roll back"
            )
    model.load_state_dict({name: tensors[name].to(ref.dtype) for name, ref in expected.items()})


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint loaded from the bytes that were verified: the model (eval mode), its
    manifest, and the sha256 of the manifest and weights bytes that were read."""

    model: RecurrentModel
    manifest: Manifest
    manifest_sha256: str
    weights_sha256: str


def load_verified(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    expect_manifest_sha256: str | None = None,
    expect_weights_sha256: str | None = None,
    max_weights_bytes: int = MAX_WEIGHTS_BYTES,
    max_manifest_bytes: int = MAX_MANIFEST_BYTES,
) -> VerifiedCheckpoint:
    """Read each file of the checkpoint once, verify those bytes, load from the same bytes.

    The manifest's sha256 must be ``expect_manifest_sha256`` and the weights' the manifest's
    ``weights_sha256`` (and ``expect_weights_sha256``, if given: what a signed announcement
    says); the tensors must have the names, shapes and dtypes of the manifest's model config
    and finite values. Symbolic links, non-regular files and files over the caps are refused.
    Raises `CheckpointError` saying what was wrong.

    Example::

        found = load_verified("runs/registry/versions/m-1a2b", expect_manifest_sha256=sha)
        found.model, found.manifest
    """
    where = Path(directory)
    dir_fd = open_directory(where)
    try:
        raw_manifest = read_file_once(where, MANIFEST_FILE, limit=max_manifest_bytes, dir_fd=dir_fd)
        manifest_sha = hashlib.sha256(raw_manifest).hexdigest()
        if expect_manifest_sha256 is not None and manifest_sha != expect_manifest_sha256:
            raise CheckpointError(
                f"{where / MANIFEST_FILE}: sha256 {manifest_sha[:12]}… does not match the "
                f"manifest sha256 announced, {expect_manifest_sha256[:12]}…; the registry copy "
                "was modified after publishing — refusing to load it"
            )
        manifest = _parse_manifest(where, raw_manifest)
        raw_weights = read_file_once(where, WEIGHTS_FILE, limit=max_weights_bytes, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    weights = where / WEIGHTS_FILE
    digest = hashlib.sha256(raw_weights).hexdigest()
    for expected in (manifest.weights_sha256, expect_weights_sha256):
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"{weights}: sha256 {digest} does not match the manifest's {expected}; "
                "the weights were modified or corrupted — refusing to load them"
            )
    try:
        config = ModelConfig.from_dict(manifest.model_config)
    except (ModelConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: manifest model_config is invalid: {exc}") from exc
    try:
        tensors = load_safetensors(raw_weights)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    del raw_weights
    model = RecurrentModel(config)
    try:
        load_weights_into(model, tensors)
    except WeightsError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return VerifiedCheckpoint(model.to(device).eval(), manifest, manifest_sha, digest)


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[RecurrentModel, Manifest]:
    """Verify and load a checkpoint (`load_verified`: each file read once); the model comes
    back in eval mode on ``device``.

    Example::

        model, manifest = load_checkpoint("runs/m1")
        print(manifest.version, manifest.metrics)
    """
    found = load_verified(directory, device=device)
    return found.model, found.manifest
