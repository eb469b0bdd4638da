"""Model versions: checkpoints on disk (safetensors + JSON manifest), verified on load."""

from stream_rnn.registry.checkpoint import (
    Manifest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from stream_rnn.registry.exceptions import CheckpointError, RegistryError

__all__ = [
    "CheckpointError",
    "Manifest",
    "RegistryError",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]
