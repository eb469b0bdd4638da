"""`WorkerOptions`: everything one stream worker process needs, filled from `Settings`.

Example::

    opts = WorkerOptions.from_settings("runs/lang", get_settings(), group="g1", max_batch=512)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from stream_rnn.ops.settings import Settings

__all__ = ["WorkerOptions"]


@dataclass(frozen=True)
class WorkerOptions:
    """Everything one worker process needs; `from_settings` fills it from `Settings`."""

    model_dir: Path
    bootstrap: str
    device: str = "cpu"
    group: str = "stream-rnn-worker"
    tokens_topic: str = "stream-rnn.tokens"
    predictions_topic: str = "stream-rnn.predictions"
    dead_letter_topic: str = "stream-rnn.dead-letters"
    partitions: int | None = None
    max_batch: int = 1024
    max_wait_s: float = 0.005
    max_message_bytes: int = 4096
    max_chunk_tokens: int = 256
    unknown_token: Literal["unk", "reject"] = "unk"  # noqa: S105 - a policy, not a secret
    capacity: int = 100_000
    ttl_s: float | None = None
    storage: str = "float32"
    running_estimate: bool = False
    expire_interval_s: float = 5.0
    stats_interval_s: float = 10.0
    checkpoint_interval_s: float = 2.0
    checkpoint_every: int = 50_000
    engine_thread: bool = False
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 3.0
    guarantee: Literal["exactly-once", "at-least-once"] = "exactly-once"
    commit_interval_s: float = 0.1
    state_retention_s: float | None = None
    broker_timeout_s: float = 120.0
    fault_engine_batch: int | None = None
    web_port: int | None = None
    web_host: str = "127.0.0.1"
    metrics_port: int | None = None  # /metrics (Prometheus); None: not served
    metrics_host: str = "127.0.0.1"
    faust_metrics: bool = False  # faust's own Prometheus sensor too (faust_* names)
    worker_dir: Path = Path("/tmp/stream-rnn-worker")  # noqa: S108 - overridden by settings
    log_level: str = "INFO"
    # the learning loop: serve the registry's production version and follow its announcements
    registry: Path | None = None
    update_key_file: Path | None = None
    allow_unsigned_updates: bool = False
    model_updates_topic: str = "stream-rnn.model-updates"
    history: int = 0  # tokens kept per key for a rewarm after a swap (0: off)
    swap_policy: Literal["keep", "reset", "rewarm"] | None = None  # restores across versions
    # decided at start-up (`stream.follow.startup_model`), reported by the status page
    update_seq: int = 0  # the highest valid announcement sequence number seen at start-up
    startup_refusal: str | None = None  # why the announced version is not served
    serving_fallback: bool = False  # an older registry version serves because of that

    @classmethod
    def from_settings(
        cls, model_dir: str | Path, settings: Settings, **overrides: Any
    ) -> WorkerOptions:
        """Options from ``settings``; ``overrides`` (CLI flags) win where not None.

        ``partitions`` is never taken from the settings: given, it is a requirement on the
        tokens topic; absent, an existing topic is used as it is (a new one gets
        ``settings.partitions``).
        """
        names = {f.name for f in fields(cls)} - {"partitions"}
        if "registry" not in settings.model_fields_set:
            names.discard("registry")  # the default directory is not a request to follow it
        base = {name: getattr(settings, name) for name in names if hasattr(settings, name)}
        opts = cls(**{**base, "model_dir": Path(model_dir)})
        return replace(opts, **{k: v for k, v in overrides.items() if v is not None})

    def settings(self, base: Settings) -> Settings:
        """``base`` with this worker's topic names (for `ensure_topics`)."""
        return base.model_copy(
            update={
                "tokens_topic": self.tokens_topic,
                "predictions_topic": self.predictions_topic,
                "dead_letter_topic": self.dead_letter_topic,
            }
        )
