"""Model versions: checkpoints on disk (safetensors + JSON manifest), verified on load.

`Registry` keeps immutable versions and the production pointer; model-update announcements
(Kafka) live in `stream_rnn.registry.updates`, imported on its own so that this package does
not pull in a Kafka client.
"""

from stream_rnn.registry.checkpoint import (
    Manifest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from stream_rnn.registry.exceptions import (
    AnnouncementError,
    CheckpointError,
    RegistryError,
    UpdateRejected,
)
from stream_rnn.registry.versions import Registry, VersionInfo

__all__ = [
    "AnnouncementError",
    "CheckpointError",
    "Manifest",
    "Registry",
    "RegistryError",
    "UpdateRejected",
    "VersionInfo",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]
