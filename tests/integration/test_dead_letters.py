"""Fuzz the worker on the real broker: thousands of malformed messages among valid sequences.

Every malformed message must reach the dead-letter topic with its original key and value
bytes, its ``partition:offset`` and the right reason; every valid sequence must still get
exactly its offline predictions (malformed messages carry the valid sequences' keys, so a
leak into their state would show); the worker must keep running throughout.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from stream_harness import (
    StreamTopicsFactory,
    WorkerFactory,
    assert_matches_offline,
    count_types,
    expected_count,
    make_model,
)

from stream_rnn.stream.codec import decode_dead_letter
from stream_rnn.stream.collect import collect
from stream_rnn.train.data import records_to_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
N_MALFORMED = 5_000
MAX_BYTES = 4096
WAIT_S = 120.0

Make = Callable[[int, str], tuple[bytes | None, bytes | None]]


def _v(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


# reason -> ways to break a message; each gets (i, a key of the valid sequences) and returns
# (Kafka key, value). Each way has exactly one defect, so the reason is unambiguous.
CASES: dict[str, list[Make]] = {
    "not_json": [
        lambda i, k: (k.encode(), f"not json {i}".encode()),
        lambda i, k: (k.encode(), b"\xff\xfe" + str(i).encode()),
        lambda i, k: (k.encode(), b""),
        lambda i, k: (k.encode(), None),  # a tombstone
        lambda i, k: (k.encode(), b'{"v":1,"type":"token","token":"a"'),  # truncated
    ],
    "not_object": [
        lambda i, k: (k.encode(), f"[{i}, 2]".encode()),
        lambda i, k: (k.encode(), b'"a string"'),
        lambda i, k: (k.encode(), str(i).encode()),
        lambda i, k: (k.encode(), b"null"),
    ],
    "missing_field": [
        lambda i, k: (k.encode(), _v({"type": "token", "token": "a"})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token"})),
        lambda i, k: (k.encode(), _v({"v": 1, "token": "a"})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "generate"})),
    ],
    "extra_field": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": "a", "x": i})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "end", "colour": "red"})),
    ],
    "wrong_type": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": True})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": i + 0.5})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": "a", "ts": "now"})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": 5})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "generate", "n": "3"})),
    ],
    "bad_version": [
        lambda i, k: (k.encode(), _v({"v": 2, "type": "token", "token": "a"})),
        lambda i, k: (k.encode(), _v({"v": "1", "type": "end"})),
    ],
    "missing_key": [
        lambda i, k: (None, _v({"v": 1, "type": "token", "token": "a"})),
        lambda i, k: (b"", _v({"v": 1, "type": "end"})),
        lambda i, k: (b"\xff\xfe", _v({"v": 1, "type": "token", "token": "a"})),
    ],
    "unknown_token": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": f"§{i}"})),
    ],
    "token_out_of_range": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": 0})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": 10_000 + i})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": -1 - i})),
    ],
    "oversized": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": "a" * MAX_BYTES})),
    ],
    "unknown_key": [  # well-formed controls for keys that never sent a token
        lambda i, k: (f"ghost-{i}".encode(), _v({"v": 1, "type": "end"})),
        lambda i, k: (f"ghost-{i}".encode(), _v({"v": 1, "type": "reset"})),
        lambda i, k: (f"ghost-{i}".encode(), _v({"v": 1, "type": "generate", "n": 3})),
    ],
    "bad_value": [
        lambda i, k: (k.encode(), _v({"v": 1, "type": "generate", "n": 0})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "tok", "token": "a"})),
        lambda i, k: (k.encode(), _v({"v": 1, "type": "token", "token": "a", "ts": -1})),
    ],
}


def _read_dead_letters(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT_S
        while len(letters) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200, max_records=10_000).values():
                letters += [decode_dead_letter(rec.value) for rec in batch]
        return letters
    finally:
        consumer.close()


def test_every_malformed_message_is_dead_lettered_and_valid_ones_scored(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, _, records = make_model(tmp_path, "next-token", 60, seed=5)
    topics = stream_topics(partitions=2)
    worker = worker_factory(
        model_dir, *topics.worker_args(), "--unknown", "reject", "--max-bytes", str(MAX_BYTES)
    )
    worker.wait_until(lambda s: len(s["assigned"]) == 2, "both partitions assigned")

    rng = random.Random(13)
    keys = sorted({r.key for r in records})
    plan: list[tuple[str | None, bytes | None, bytes | None]] = []  # (reason, key, value)
    for ev in records_to_events(records, level="char", interleave_seed=3):
        wire = {"v": 1, "type": ev["type"], **({"token": ev["token"]} if "token" in ev else {})}
        plan.append((None, ev["key"].encode(), _v(wire)))
    ways = [(reason, make) for reason, makes in CASES.items() for make in makes]
    for i in range(N_MALFORMED):
        reason, make = ways[i % len(ways)]
        key, value = make(i, rng.choice(keys))
        plan.insert(rng.randrange(len(plan) + 1), (reason, key, value))  # valid order is kept

    producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", linger_ms=5)
    futures = [producer.send(topics.tokens, value=v, key=k) for _, k, v in plan]
    producer.flush(60)
    producer.close()
    sent: dict[tuple[int, int], tuple[str, bytes | None, bytes | None]] = {}
    for (reason, key, value), fut in zip(plan, futures, strict=True):
        meta = fut.get(timeout=10)
        if reason is not None:
            sent[(meta.partition, meta.offset)] = (reason, key, value)

    total = expected_count("next-token", records)
    lines = collect(
        kafka_broker,
        topics.predictions,
        timeout_s=WAIT_S,
        max_wait_s=WAIT_S,
        until=count_types({"next", "end"}, total),
    )
    assert_matches_offline(lines, model_dir, records)

    letters = _read_dead_letters(kafka_broker, topics.dead_letters, N_MALFORMED)
    assert len(letters) == N_MALFORMED  # none lost, none extra (at least once: no restarts here)
    got = {(d["partition"], d["offset"]): d for d in letters}
    assert set(got) == set(sent)  # exactly the malformed ones, no valid message among them
    for where, (reason, key, value) in sent.items():
        letter = got[where]
        assert letter["reason"] == reason, (where, value, letter["detail"])
        assert letter["value"] == (value or b"") and letter["key"] == key
        assert letter["topic"] == topics.tokens and letter["detail"]

    expected = Counter(reason for reason, _, _ in sent.values())
    assert Counter(d["reason"] for d in letters) == expected
    assert len(expected) == len(CASES) and min(expected.values()) >= 100
    assert worker.alive(), worker.log_tail()
    status = worker.status()
    assert status is not None and status["dead_letters"] == dict(expected)
    assert status["predictions"] == total
