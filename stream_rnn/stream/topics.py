"""The stream topics: names from the settings, and their creation (idempotent) with kafka-python.

Four topics, all keyed by the sequence key:

* ``tokens`` (``settings.tokens_topic``): input events; its partitions are the unit of
  parallelism and of state ownership;
* ``<tokens>-state``: compacted, exactly as many partitions as ``tokens`` (co-partitioned:
  partition p of the state topic holds the checkpoints of the keys of tokens partition p);
* ``predictions`` and ``dead letters``: outputs, as many partitions as ``tokens``.

Example::

    from stream_rnn.ops.settings import get_settings
    from stream_rnn.stream.topics import ensure_topics

    layout = ensure_topics("127.0.0.1:9092", get_settings(), partitions=8)
    print(layout.tokens, layout.partitions)   # stream-rnn.tokens 8
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream_rnn.ops.settings import Settings
from stream_rnn.stream.exceptions import StreamError

READY_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 15.0
ADMIN_TIMEOUT_MS = 10_000
UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION


class TopicError(StreamError):
    """A topic is missing, cannot be created, or is laid out differently than required."""


@dataclass(frozen=True)
class TopicLayout:
    """Names of the stream topics and the partition count they share."""

    tokens: str
    state: str
    predictions: str
    dead_letters: str
    partitions: int


def state_topic(tokens_topic: str) -> str:
    """Name of the compacted checkpoint topic of ``tokens_topic``: ``<tokens>-state``."""
    return f"{tokens_topic}-state"


def state_topic_config(settings: Settings) -> dict[str, str]:
    """Topic configs of a new state topic: compacted; with replication, ``min.insync.replicas``
    = RF - 1 so that acks=all (and every transaction) survives one broker down."""
    config = {"cleanup.policy": "compact"}
    if settings.replication > 1:
        config["min.insync.replicas"] = str(settings.replication - 1)
    return config


def layout(settings: Settings, partitions: int | None = None) -> TopicLayout:
    """The topic names of ``settings`` (no broker contact); ``partitions`` defaults to theirs."""
    return TopicLayout(
        tokens=settings.tokens_topic,
        state=state_topic(settings.tokens_topic),
        predictions=settings.predictions_topic,
        dead_letters=settings.dead_letter_topic,
        partitions=settings.partitions if partitions is None else partitions,
    )


def partition_counts(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partition count of each existing topic of ``topics`` (missing topics are left out)."""
    counts: dict[str, int] = {}
    for described in admin.describe_topics(topics):
        if described.get("error_code", 0) == UNKNOWN_TOPIC:
            continue
        counts[described["name"]] = len(described.get("partitions") or [])
    return counts


def ensure_topics(
    bootstrap: str,
    settings: Settings,
    *,
    partitions: int | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> TopicLayout:
    """Create the missing stream topics; check the partition counts of existing ones.

    ``partitions`` None: an existing tokens topic keeps its count, a new one gets
    ``settings.partitions``. Given explicitly, an existing tokens topic must have exactly that
    many. The state topic must always match the tokens topic: checkpoints are per partition.
    Safe to run from several workers at once (a lost creation race is not an error).
    """
    if partitions is not None and partitions < 1:
        raise TopicError(f"partitions must be >= 1, got {partitions}")
    wanted = layout(settings, partitions)
    names = [wanted.tokens, wanted.state, wanted.predictions, wanted.dead_letters]
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="stream-rnn-topics",
            request_timeout_ms=ADMIN_TIMEOUT_MS,
            bootstrap_timeout_ms=int(connect_timeout_s * 1000),
        )
    except KafkaError as err:
        raise TopicError(
            f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka up) "
            "or pass --bootstrap HOST:PORT"
        ) from err
    try:
        existing = partition_counts(admin, names)
        count = existing.get(wanted.tokens, wanted.partitions)
        if partitions is not None and count != partitions:
            raise TopicError(
                f"topic {wanted.tokens!r} exists with {count} partitions, not the {partitions} "
                "asked for; leave --partitions out to use it as it is, or pick another topic name"
            )
        state_count = existing.get(wanted.state, count)
        if state_count != count:
            raise TopicError(
                f"checkpoint topic {wanted.state!r} has {state_count} partitions but "
                f"{wanted.tokens!r} has {count}; they must be co-partitioned: delete "
                f"{wanted.state!r} (its checkpoints are lost) or recreate {wanted.tokens!r} with "
                f"{state_count} partitions"
            )
        configs: dict[str, dict[str, str]] = {wanted.state: state_topic_config(settings)}
        missing = {
            name: {
                "num_partitions": count,
                "replication_factor": settings.replication,
                "configs": configs.get(name, {}),
            }
            for name in names
            if name not in existing
        }
        if missing:
            create_topics(admin, missing)
            wait_topics_ready(admin, list(missing), timeout_s)
            # A concurrent creator may have won a race with another partition count.
            recount = partition_counts(admin, [wanted.tokens, wanted.state])
            if recount.get(wanted.state) != recount.get(wanted.tokens):
                raise TopicError(
                    f"{wanted.tokens!r} and {wanted.state!r} ended up with {recount} partitions "
                    "(created concurrently with different counts); delete both and retry"
                )
            count = recount[wanted.tokens]
    except KafkaError as err:
        raise TopicError(
            f"Kafka at {bootstrap} refused to describe or create {names} ({err}); check the "
            "broker log and that this client may create topics"
        ) from err
    finally:
        admin.close()
    return TopicLayout(wanted.tokens, wanted.state, wanted.predictions, wanted.dead_letters, count)


def create_topics(admin: KafkaAdminClient, topics: dict[str, dict[str, Any]]) -> None:
    # One request per topic so that losing a creation race on one does not hide the others.
    for name, spec in topics.items():
        try:
            admin.create_topics({name: spec}, timeout_ms=ADMIN_TIMEOUT_MS)
        except TopicAlreadyExistsError:
            pass


def wait_topics_ready(admin: KafkaAdminClient, topics: list[str], timeout_s: float) -> None:
    # CreateTopics returns once the controller accepted; clients sending before every partition
    # has a leader would get retriable NOT_LEADER errors.
    deadline = time.monotonic() + timeout_s
    while True:
        described = admin.describe_topics(topics)
        ready = all(
            d.get("error_code", 0) == 0
            and d.get("partitions")
            and all(p.get("leader_id", -1) >= 0 for p in d["partitions"])
            for d in described
        )
        if ready:
            return
        if time.monotonic() >= deadline:
            raise TopicError(
                f"topics {topics} still have partitions without a leader after {timeout_s:.0f}s; "
                "check the broker (stream-rnn kafka status) and its log"
            )
        time.sleep(0.1)
