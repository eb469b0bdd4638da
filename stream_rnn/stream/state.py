"""Durable per-key states on a compacted Kafka topic, co-partitioned with the tokens topic.

A record's key is the sequence key; its value is a small JSON header line followed by the raw
state tensors (no pickle — states are data). The header carries the key's last applied
source offset, so a restore is exactly-once per key: tokens of the key at or below that offset
are redeliveries and are skipped. A deleted key (``end``, state retention) gets a tombstone
whose header carries the offset that deleted it. Restores read committed records only and take
per key the record with the highest applied offset (a tombstone at or above it deletes), so a
late write from a stale owner cannot move a key backwards; under exactly-once the last record
written per key is also the newest, so what compaction keeps is always right.

The header also names the model version that produced the state and, when the pool keeps
token histories (for a rewarm after a model swap), how many token ids follow the tensors: the
history is as durable as the state. Records without them (written before states named their
version) still decode, with an unknown version; the engine gives a state whose version is not
its own the deployment's swap policy when the key is admitted (`stream_rnn.engine.versions`).

Example::

    writer = StateWriter("127.0.0.1:9092", "stream-rnn.tokens-state")
    await writer.start()
    await writer.write(partition=2, states=pool.take_dirty(partition=2))
    restored = await restore_partition("127.0.0.1:9092", "stream-rnn.tokens-state", 2)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream_rnn.engine.store import StoredState, decode_origin, decode_state, encode_states
from stream_rnn.stream.exceptions import StreamError


class StateError(StreamError):
    """A state record could not be written or read back from the state topic."""


class StateWriter:
    """Writes key states to the state topic (acks=all, idempotent), partition by partition."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        self.records = 0
        self.bytes = 0

    async def start(self) -> None:
        # aiokafka clients bind to the running loop: create it here, not in __init__
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_batch_size=1 << 20,
                max_request_size=8 << 20,
            )
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def write(
        self,
        partition: int,
        states: Sequence[tuple[str, StoredState]],
        deleted: Sequence[tuple[str, int]] = (),
    ) -> int:
        """Write ``states`` (and tombstones for ``deleted`` ``(key, applied offset)``) to
        ``partition`` and wait until the broker has them all (durable); returns how many."""
        producer = self._producer
        if producer is None:
            raise StateError("StateWriter.write() before start(); call await writer.start()")
        futures, size = await send_state_records(producer, self.topic, partition, states, deleted)
        self.bytes += size
        if futures:
            await asyncio.gather(*futures)
        self.records += len(states) + len(deleted)
        return len(states) + len(deleted)


TOMBSTONE_OFFSET = "applied-offset"  # header of a tombstone: the offset that deleted the key


ENCODE_SLICE = 512  # state records encoded and appended between two turns of the event loop
_Record = tuple[str, bytes | None, list[tuple[str, bytes]]]  # key, value (None: tombstone), headers


async def send_state_records(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    states: Sequence[tuple[str, StoredState]],
    deleted: Sequence[tuple[str, int]] = (),
) -> tuple[list[asyncio.Future[Any]], int]:
    """Hand state records and tombstones to ``producer`` in whole broker batches.

    Returns the batches' futures and the bytes appended. A tombstone (value None) carries the
    source offset that deleted the key in a header, so that a restore never lets an older
    state shadow a deletion (nor a deletion a newer state). A send() per record costs about as
    much as the rest of a checkpoint, hence the batches.
    """
    futures: list[asyncio.Future[Any]] = []
    size = 0
    batch = producer.create_batch()
    tombstones: list[_Record] = [
        (key, None, [(TOMBSTONE_OFFSET, str(off).encode())]) for key, off in deleted
    ]
    # A checkpoint runs beside the micro-batches: it is encoded and appended in slices, and the
    # event loop gets a turn after each (a 10,000-key checkpoint in one go held the loop for
    # ~100 ms, the p99 of every token that arrived meanwhile).
    for start in range(0, max(len(states), 1), ENCODE_SLICE):
        part = states[start : start + ENCODE_SLICE]
        values = encode_states([state for _, state in part])
        records: list[_Record] = [
            (key, value, []) for (key, _), value in zip(part, values, strict=True)
        ]
        if start + ENCODE_SLICE >= len(states):
            records += tombstones
        for key, value, headers in records:
            raw_key = key.encode("utf-8")
            size += len(value) if value is not None else 0
            if batch.append(key=raw_key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=raw_key, value=value, timestamp=None, headers=headers) is None:
                    raise StateError(
                        f"the state of key {key!r} ({len(value or b'')} bytes) does not fit an "
                        "empty batch; raise the producer's max_batch_size"
                    )
        if start + ENCODE_SLICE < len(states):
            await asyncio.sleep(0)
    if batch.record_count():
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures, size


class EncodedState(NamedTuple):
    """A key's newest state record as read back: its applied offset, source partition and the
    encoded bytes (`stream_rnn.engine.store.decode_state` turns them into a `StoredState`),
    and the model version named in its header (``None``: the record names none; a restore can
    `Engine.remember` the manifests of the versions it found)."""

    offset: int
    partition: int
    value: bytes
    ts: float = 0.0  # when the record was written (seconds since the epoch)
    version: str | None = None


async def restore_partition(
    bootstrap: str, topic: str, partition: int, *, timeout_s: float = 60.0
) -> dict[str, StoredState]:
    """Read a state-topic partition from the beginning to its end: the newest state per key.

    "Newest" is the highest applied offset, not the last written record; deleted keys (a
    tombstone at or after their newest state) are left out. Only committed records are read.
    """
    newest = await read_partition(bootstrap, topic, partition, timeout_s=timeout_s)
    return {key: decode_state(rec.value) for key, rec in newest.items()}


async def read_partition(
    bootstrap: str, topic: str, partition: int, *, timeout_s: float = 60.0
) -> dict[str, EncodedState]:
    """Like `restore_partition`, with the states left encoded (only headers are parsed).

    Holds no more than the partition's live keys: a tombstone removes its key at once.
    ``read_committed``: records of open or aborted transactions (a fenced zombie's) are never
    read; the end is the last stable offset.
    """
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    states: dict[str, EncodedState] = {}
    deleted_at: dict[str, int] = {}  # key -> offset that deleted it (until a newer state)
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        position = await consumer.position(tp)
        while position < end:
            if time.monotonic() > deadline:
                raise StateError(
                    f"restoring {topic}[{partition}] took over {timeout_s:.0f}s (at offset "
                    f"{position} of {end}); is the broker healthy?"
                )
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
            for record in batches.get(tp, []):
                if record.key is None:
                    continue
                key = record.key.decode("utf-8")
                if record.value is None:  # tombstone: the key's state was deleted on purpose
                    gone = _tombstone_offset(record.headers)
                    old = states.get(key)
                    if old is None or gone is None or old.offset <= gone:
                        states.pop(key, None)
                        deleted_at[key] = gone if gone is not None else -1
                    continue
                offset, source, version = decode_origin(record.value)
                old = states.get(key)
                if (old is None or offset >= old.offset) and offset > deleted_at.get(key, -2):
                    states[key] = EncodedState(
                        offset, source, record.value, record.timestamp / 1000, version
                    )
                    deleted_at.pop(key, None)
            position = await consumer.position(tp)
    finally:
        await consumer.stop()
    return states


def _tombstone_offset(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    for name, value in headers or ():
        if name == TOMBSTONE_OFFSET:
            try:
                return int(value)
            except ValueError:
                return None
    return None
