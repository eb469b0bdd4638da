"""Deletion: 100,000 keys, each one token and an ``end``; after compaction the state topic holds
no live record for any of them, and a restore of every partition holds 0 keys.

``end`` deletes a key's state everywhere: the engine forgets it, and the transaction that
commits the ``end``'s prediction also writes a tombstone for it on the state topic. The topic is
set to compact within seconds (tiny segments, tombstones kept 1 s), so the test also sees the
broker drop the states and then the tombstones themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from chaos_harness import (
    ChaosWorkersFactory,
    compact_fast,
    count_records,
    end_offsets,
    new_producer,
    read_predictions_raw,
    read_states_last_written,
    token_value,
    wait_consumed,
)
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory

from stream_rnn.stream.state import read_partition
from stream_rnn.stream.topics import state_topic

N_KEYS = 100_000
PARTITIONS = 4
# Kafka's log cleaner is one thread for every compacted log of the broker: in a full test run
# it also works through the state, offsets and transaction topics of earlier tests (once
# 10,473 of 100,157 records were left after 60 s). The loop ends as soon as it is done.
COMPACTION_S = 180.0


def _end_value() -> bytes:
    return orjson.dumps({"v": 1, "type": "end", "ts": time.time()})


def test_ended_keys_leave_nothing_on_the_state_topic(
    gru_model: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=PARTITIONS)
    group = unique_name("deletion")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "1024")
    [worker] = pool.start_assigned(1)
    state = state_topic(topics.tokens)
    compact_fast(kafka_broker, state)

    producer = new_producer(kafka_broker, batch_size=256 * 1024)
    try:
        for i in range(N_KEYS):
            key = f"visitor-{i:06d}".encode()
            producer.send(topics.tokens, key=key, value=token_value("abcdefghij"[i % 10]))
            producer.send(topics.tokens, key=key, value=_end_value())
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)
    wait_consumed(kafka_broker, group, topics, timeout=240, workers=lambda: [worker])
    processed = time.monotonic() - started
    status = worker.status() or {}
    assert status.get("keys_resident") == 0 and status.get("keys_stored") == 0, status
    assert worker.stop() == 0, worker.log_tail()

    ends = [p for p in read_predictions_raw(kafka_broker, topics) if p["type"] == "end"]
    assert len(ends) == N_KEYS and len({p["id"] for p in ends}) == N_KEYS

    async def restore_all() -> int:
        total = 0
        for p in range(PARTITIONS):
            total += len(await read_partition(kafka_broker, state, p, timeout_s=120))
        return total

    assert asyncio.run(restore_all()) == 0, "a restore brought back deleted keys"
    # What compaction keeps (the last record per key) holds no live state either.
    live = read_states_last_written(kafka_broker, topics)
    assert not live, (
        f"{len(live)} ended keys still have a live state record, e.g. {next(iter(live))}"
    )
    # Compaction drops the states, then (after delete.retention.ms) the tombstones; only the
    # partitions' active segments (never cleaned) keep theirs. A segment rolls only when a
    # record arrives after segment.ms: with the worker stopped, the last transactions (large
    # ones when the worker runs flat out) would stay in the active segments for ever. One
    # tombstone per partition rolls them, as the next writes of a live stream would.
    time.sleep(1.0)
    roller = new_producer(kafka_broker)
    try:
        for p in range(PARTITIONS):
            roller.send(state, key=b"segment-roll", value=None, partition=p)
        roller.flush(timeout=30)
    finally:
        roller.close(timeout=30)
    written = sum(end_offsets(kafka_broker, state, PARTITIONS).values())
    deadline = time.monotonic() + COMPACTION_S
    remaining = count_records(kafka_broker, state, PARTITIONS)
    while remaining > written // 10 and time.monotonic() < deadline:
        time.sleep(2.0)
        remaining = count_records(kafka_broker, state, PARTITIONS)
    elapsed = time.monotonic() - started
    print(
        f"\ndeletion: {N_KEYS} keys ended, processed in {processed:.0f}s; state topic: "
        f"{written} offsets written (states, tombstones, transaction markers), {remaining} "
        f"records left after compaction; restore holds 0 keys; {elapsed:.0f}s in all"
    )
    record_property("state_offsets_written", written)
    record_property("state_records_after", remaining)
    assert remaining <= written // 10, f"compaction left {remaining} of {written} records"
