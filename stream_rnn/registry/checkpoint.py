"""Checkpoints: a directory with ``weights.safetensors`` and ``manifest.json``.

Weights are data, never code: tensors go through safetensors, everything else through JSON,
and nothing is ever unpickled. Loading rebuilds the network from the manifest's own model
config (never from the caller's flags) and refuses a checkpoint whose weights file does not
match the recorded sha256, lacks a tensor, has a wrong shape or holds a non-finite value.
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
from safetensors.torch import load_file, save_file

from stream_rnn import __version__
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.exceptions import ModelConfigError, WeightsError
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.exceptions import CheckpointError

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


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


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once (temp file in the same directory, fsync,
    ``os.replace``): a reader sees the old content or the new, never part of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    where = Path(directory)
    path = where / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{where} is not a checkpoint: {MANIFEST_FILE} is missing "
            "(train one with `stream-rnn train --out DIR`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[RecurrentModel, Manifest]:
    """Verify and load a checkpoint; the model comes back in eval mode on ``device``.

    Example::

        model, manifest = load_checkpoint("runs/m1")
        print(manifest.version, manifest.metrics)
    """
    where = Path(directory)
    manifest = read_manifest(where)
    weights = where / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} is missing; the checkpoint is incomplete")
    digest = sha256_file(weights)
    if digest != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {digest} does not match the manifest's {manifest.weights_sha256}; "
            "the weights were modified or corrupted — refusing to load them"
        )
    try:
        config = ModelConfig.from_dict(manifest.model_config)
    except (ModelConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: manifest model_config is invalid: {exc}") from exc
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = RecurrentModel(config)
    try:
        load_weights_into(model, tensors)
    except WeightsError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return model.to(device).eval(), manifest
