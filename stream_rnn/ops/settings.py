"""One frozen settings object, configurable from the environment (prefix ``STREAM_RNN_``).

CLI flags override these; deployment files set the environment.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide defaults.

    Example::

        STREAM_RNN_DEVICE=cuda stream-rnn score ...   # or Settings(device="cuda")
    """

    model_config = SettingsConfigDict(env_prefix="STREAM_RNN_", frozen=True, extra="ignore")

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 or auto")
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap HOST:PORT")
    kafka_data_dir: Path = Field(
        Path.home() / ".local" / "state" / "stream-rnn" / "kafka",
        description="data directory of the local development broker",
    )
    runs_dir: Path = Field(Path("runs"), description="where demo artefacts go")
    # model registry and updates
    registry: Path = Field(
        Path("runs/registry"),
        description="model registry directory: immutable versions and the production pointer",
    )
    update_key_file: Path | None = Field(
        None,
        description="key file of model-update announcements: Ed25519 private key (publisher) "
        "or public key (workers), from `stream-rnn models keygen`, or an HMAC secret shared by "
        "both (chmod 600, 32 random bytes); None: unsigned",
    )
    allow_unsigned_updates: bool = Field(
        False,
        description="workers: accept unsigned model-update announcements (anyone who can write "
        "the updates topic can then choose the served version); off: a registry worker "
        "without --update-key-file refuses to start",
    )
    history: int = Field(
        0, ge=0, description="tokens kept per key so that a model swap can rewarm states (0: off)"
    )
    swap_policy: Literal["keep", "reset", "rewarm"] | None = Field(
        None,
        description="states restored under another model version: keep, reset or rewarm "
        "(default: rewarm with a history, else reset)",
    )
    model_updates_topic: str = Field(
        "stream-rnn.model-updates",
        description="compacted topic on which the registry announces the production version",
    )
    # topics
    tokens_topic: str = Field("stream-rnn.tokens", description="input topic (key = sequence key)")
    predictions_topic: str = Field("stream-rnn.predictions", description="output topic")
    dead_letter_topic: str = Field("stream-rnn.dead-letters", description="rejected input")
    partitions: int = Field(4, ge=1, description="partitions of a newly created tokens topic")
    replication: int = Field(1, ge=1, description="replication factor of newly created topics")
    # worker
    group: str = Field("stream-rnn-worker", description="consumer group (faust app id)")
    max_batch: int = Field(1024, ge=1, description="largest micro-batch (messages)")
    max_wait_s: float = Field(0.005, gt=0, description="longest wait to fill a micro-batch")
    max_message_bytes: int = Field(4096, ge=16, description="larger values are dead-lettered")
    max_chunk_tokens: int = Field(
        256,
        ge=1,
        description="most tokens one 'tokens' event (a chunk) may carry; larger chunks are "
        "dead-lettered (reason oversized), as are values over max_message_bytes",
    )
    unknown_token: Literal["unk", "reject"] = Field(
        "unk", description="a token not in the vocabulary: map to <unk> or dead-letter it"
    )
    capacity: int = Field(100_000, ge=1, description="state pool capacity (resident keys)")
    ttl_s: float | None = Field(None, gt=0, description="idle keys leave the pool after this")
    storage: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of resident states"
    )
    running_estimate: bool = Field(False, description="classify: a label estimate per token")
    expire_interval_s: float = Field(5.0, gt=0, description="how often idle keys are expired")
    stats_interval_s: float = Field(10.0, gt=0, description="how often a worker logs its counts")
    checkpoint_interval_s: float = Field(
        2.0, ge=0, description="durable state checkpoints at least this often (0 = never)"
    )
    checkpoint_every: int = Field(
        50_000, ge=1, description="...and after this many tokens since the last one"
    )
    engine_thread: bool = Field(
        False,
        description="run the engine on a thread of its own instead of the event loop's "
        "(slower on CPU: see stream_rnn/stream/executor.py)",
    )
    session_timeout_s: float = Field(
        10.0,
        ge=6,
        le=300,
        description="a worker silent this long leaves the group and its partitions move "
        "(Kafka's group.min/max.session.timeout.ms bound it: 6-300 s by default)",
    )
    heartbeat_interval_s: float = Field(
        3.0, gt=0, description="group heartbeats (at most a third of the session timeout)"
    )
    guarantee: Literal["exactly-once", "at-least-once"] = Field(
        "exactly-once",
        description="exactly-once: predictions, dead letters, states and offsets commit in one "
        "Kafka transaction per partition; at-least-once: lower latency, duplicates after a crash",
    )
    commit_interval_s: float = Field(
        0.1, gt=0, description="exactly-once: how often the open transactions commit"
    )
    state_retention_s: float | None = Field(
        None, gt=0, description="a key idle this long is deleted (tombstone); None: kept"
    )
    broker_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a worker that cannot reach the broker this long exits with a message",
    )
    fault_engine_batch: int | None = Field(
        None,
        ge=1,
        description="fault injection for tests and drills: the engine raises after applying "
        "this micro-batch (of each worker process); never set it in production",
    )
    worker_dir: Path = Field(
        Path(tempfile.gettempdir()) / "stream-rnn-worker",
        description="faust data directories, one per worker under it",
    )
    web_host: str = Field(
        "127.0.0.1", description="address the worker status endpoint binds (0.0.0.0 in a container)"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="worker / retrain: serve Prometheus /metrics on this port"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address /metrics binds (0.0.0.0 in a container)"
    )
    faust_metrics: bool = Field(
        False, description="worker: also expose faust's own sensor (faust_* metrics)"
    )
    log_level: str = Field("INFO", description="logging level")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
