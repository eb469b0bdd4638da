"""Model-update announcements on Kafka: publish under the registry's lock, read the topic.

The registry announces its production version on a compacted Kafka topic
(``stream-rnn.model-updates``, one partition, record key ``b"production"``), so the topic
always holds the current announcement and a worker that starts late reads it from there.
The message itself (format v=2, signature, domain, sequence number) is
`stream_rnn.registry.announce`; keys are `stream_rnn.registry.keys`; what a worker checks
before serving a version is `stream_rnn.registry.verify`. This module re-exports them.

`announce_production` changes the production pointer, issues the next sequence number, signs
and publishes, all under the registry's lock: two publishers racing (a scheduled retrain and
an operator's rollback) end with the pointer and the last announcement naming one version,
and sequence numbers strictly increasing in topic order.

Example::

    announcer = Announcer(bootstrap="127.0.0.1:9092", key=load_update_key(path))
    announce_production(registry, lambda reg: reg.rollback(policy="reset"), policy="reset",
                        announcer=announcer)
    ...
    update = read_current_update("127.0.0.1:9092")      # in a worker thread
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from stream_rnn.registry.announce import (
    ARCHITECTURE_FIELDS,
    MESSAGE_VERSION,
    POLICIES,
    UPDATES_TOPIC,
    ModelUpdate,
    Policy,
    architecture_summary,
    build_update,
    canonical_json,
    check_authentic,
    sign,
    verify_signature,
)
from stream_rnn.registry.exceptions import AnnouncementError, RegistryError, UpdateRejected
from stream_rnn.registry.keys import UpdateKey, load_update_key
from stream_rnn.registry.verify import VerifiedUpdate, verify_update
from stream_rnn.registry.versions import Registry
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.topics import (
    ADMIN_TIMEOUT_MS,
    CONNECT_TIMEOUT_S,
    create_topics,
    partition_counts,
    wait_topics_ready,
)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "MESSAGE_VERSION",
    "POLICIES",
    "UPDATES_TOPIC",
    "UPDATE_KEY",
    "Announced",
    "Announcer",
    "ModelUpdate",
    "Policy",
    "UpdateKey",
    "UpdateRejected",
    "VerifiedUpdate",
    "announce_production",
    "architecture_summary",
    "build_update",
    "canonical_json",
    "check_authentic",
    "ensure_updates_topic",
    "load_update_key",
    "publish_update",
    "read_current_update",
    "read_updates",
    "sign",
    "verify_signature",
    "verify_update",
]

UPDATE_KEY = b"production"


@dataclass(frozen=True)
class Announcer:
    """Where and with which key announcements go (``key`` None: unsigned)."""

    bootstrap: str
    topic: str = UPDATES_TOPIC
    key: UpdateKey | None = None
    replication: int = 1

    def __post_init__(self) -> None:
        if self.key is not None and not self.key.can_sign:
            raise RegistryError(
                f"{self.key.source} is a public key: it cannot sign announcements; publish "
                "with the private key (update.key of `stream-rnn models keygen`)"
            )


@dataclass(frozen=True)
class Announced:
    """What `announce_production` did: the production version, the one it replaced, and the
    announcement sent (None: not announced) at ``offset``."""

    version: str
    update: ModelUpdate | None
    offset: int | None


def announce_production(
    registry: Registry,
    change: Callable[[Registry], str],
    *,
    policy: Policy,
    announcer: Announcer | None,
) -> Announced:
    """Under the registry's lock: ``change`` the pointer (returns the production version),
    then issue the next sequence number, sign, keep a copy in the registry and publish.

    ``announcer`` None changes the registry only. A failed publish raises `AnnouncementError`
    (the pointer has moved; announce again with ``models promote VERSION``).
    """
    with registry.locked():
        version = change(registry)
        if announcer is None:
            return Announced(version, None, None)
        update = build_update(
            registry, version, policy=policy, seq=registry.next_sequence(), topic=announcer.topic
        )
        if announcer.key is not None:
            update = sign(update, announcer.key)
        registry.record_announcement(update.to_bytes())
        try:
            offset = publish_update(
                announcer.bootstrap, update, announcer.topic, replication=announcer.replication
            )
        except AnnouncementError as err:
            raise AnnouncementError(
                f"{err}. Production in {registry.root} is {version} already, but running "
                f"workers were not told: announce it again with `stream-rnn models promote "
                f"{version}`"
            ) from err
    return Announced(version, update, offset)


# ------------------------------------------------------------------------------------ Kafka
def ensure_updates_topic(
    bootstrap: str, topic: str = UPDATES_TOPIC, *, replication: int = 1
) -> None:
    """Create ``topic`` (compacted, one partition) unless it exists; safe to race."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="stream-rnn-models",
            request_timeout_ms=ADMIN_TIMEOUT_MS,
            bootstrap_timeout_ms=int(CONNECT_TIMEOUT_S * 1000),
        )
    except KafkaError as err:
        raise AnnouncementError(
            f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka up), "
            "pass --bootstrap HOST:PORT, or --no-announce to only update the registry"
        ) from err
    try:
        if topic not in partition_counts(admin, [topic]):
            configs = {"cleanup.policy": "compact"}
            if replication > 1:  # as the state topic: acks=all survives one broker down
                configs["min.insync.replicas"] = str(replication - 1)
            spec = {"num_partitions": 1, "replication_factor": replication, "configs": configs}
            create_topics(admin, {topic: spec})
            wait_topics_ready(admin, [topic], 20.0)
    except (KafkaError, StreamError) as err:
        raise AnnouncementError(
            f"Kafka at {bootstrap} could not describe or create topic {topic!r} ({err}); "
            "check the broker log and that this client may create topics"
        ) from err
    finally:
        admin.close()


def publish_update(
    bootstrap: str,
    update: ModelUpdate,
    topic: str = UPDATES_TOPIC,
    *,
    replication: int = 1,
    timeout_s: float = 30.0,
) -> int:
    """Announce ``update`` (key ``b"production"``, acks=all); return its offset.

    Creates the compacted topic if missing. Returns only once the broker acknowledged the
    record on all in-sync replicas; raises `AnnouncementError` otherwise.
    """
    ensure_updates_topic(bootstrap, topic, replication=replication)
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            client_id="stream-rnn-models",
            max_block_ms=int(timeout_s * 1000),
        )
    except KafkaError as err:
        raise AnnouncementError(f"cannot reach Kafka at {bootstrap} ({err})") from err
    try:
        meta = producer.send(topic, key=UPDATE_KEY, value=update.to_bytes()).get(timeout=timeout_s)
        producer.flush(timeout=timeout_s)
    except KafkaError as err:
        raise AnnouncementError(
            f"Kafka at {bootstrap} did not take the announcement of {update.version} on "
            f"{topic!r} ({err}); nothing was announced: check the broker and publish again"
        ) from err
    finally:
        producer.close(timeout=5)
    return int(meta.offset)


def read_current_update(
    bootstrap: str, topic: str = UPDATES_TOPIC, *, timeout_s: float = 30.0
) -> ModelUpdate | None:
    """The newest announcement on ``topic`` in offset order, or None (no topic, empty, or a
    tombstone last); a newest record that is not an announcement raises ``malformed``.

    Offset order is what the topic says last, not what is freshest: a worker takes the highest
    valid sequence number of `read_updates` instead.
    """
    values = read_updates(bootstrap, topic, timeout_s=timeout_s)
    if not values or values[-1] is None:
        return None
    return ModelUpdate.from_bytes(values[-1])


def read_updates(
    bootstrap: str, topic: str = UPDATES_TOPIC, *, timeout_s: float = 30.0
) -> list[bytes | None]:
    """The value of every ``production`` record on ``topic`` (read_committed, beginning to end),
    in offset order; empty when the topic does not exist."""
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            allow_auto_create_topics=False,
            client_id="stream-rnn-models",
        )
    except KafkaError as err:
        raise AnnouncementError(f"cannot reach Kafka at {bootstrap} ({err})") from err
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AnnouncementError(
                    f"could not read {topic!r} at {bootstrap} to its end within {timeout_s:.0f}s"
                )
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    if rec.key == UPDATE_KEY:
                        found.append(rec)
    except KafkaError as err:
        raise AnnouncementError(f"cannot read {topic!r} at {bootstrap} ({err})") from err
    finally:
        consumer.close()
    found.sort(key=lambda rec: (rec.partition, rec.offset))  # one partition: offset order
    return [rec.value for rec in found]
