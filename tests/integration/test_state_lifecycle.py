"""State lifecycle on the real broker: keys idle past ``--state-retention`` are deleted
everywhere (engine, local store, state topic), and ended keys leave no live state record.

One worker, keys that receive a few tokens and then go quiet; the worker retires them after
the retention and commits tombstones. A restore of every partition then holds only the keys
still within the retention (none), and the worker's status shows none resident or stored.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer
from stream_harness import StreamTopicsFactory, WorkerFactory, make_model

from stream_rnn.stream.state import read_partition
from stream_rnn.stream.topics import state_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
RETENTION_S = 2.0


def _restore_all(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    async def read() -> dict[str, int]:
        keys: dict[str, int] = {}
        for p in range(partitions):
            keys.update(
                {k: s.offset for k, s in (await read_partition(bootstrap, topic, p)).items()}
            )
        return keys

    return asyncio.run(read())


def test_idle_keys_are_deleted_after_the_retention(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, _, records = make_model(tmp_path, "next-token", 10)
    alphabet = sorted({t for r in records for t in r.items("char")})
    topics = stream_topics(partitions=2)
    worker = worker_factory(
        model_dir, *topics.worker_args(), "--state-retention", str(RETENTION_S), "--capacity", "4",
        env={"STREAM_RNN_EXPIRE_INTERVAL_S": "0.5", "STREAM_RNN_TTL_S": "1"},
    )  # fmt: skip
    worker.wait_until(lambda s: len(s["assigned"]) == 2, "partitions")
    producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
    keys = [f"idle-{i}" for i in range(12)]  # more than --capacity: some sit in the local store
    for key in keys:
        for token in alphabet[:3]:
            value = orjson.dumps({"v": 1, "type": "token", "token": token})
            producer.send(topics.tokens, key=key.encode(), value=value)
    # one key ends its sequence: deleted at once, by its end
    producer.send(
        topics.tokens,
        key=b"ended",
        value=orjson.dumps({"v": 1, "type": "token", "token": alphabet[0]}),
    )
    producer.send(topics.tokens, key=b"ended", value=orjson.dumps({"v": 1, "type": "end"}))
    producer.flush(30)
    producer.close()
    worker.wait_until(lambda s: s["tokens"] == 37, "every token processed", 60)
    state = state_topic(topics.tokens)
    live = _restore_all(kafka_broker, state, 2)
    assert "ended" not in live  # the end deleted it in the same transaction
    assert set(live) <= set(keys)
    status = worker.wait_until(
        lambda s: s["keys_resident"] == 0 and s["keys_stored"] == 0,
        "every idle key deleted",
        RETENTION_S + 30,
    )
    deadline = time.monotonic() + 30
    while (live := _restore_all(kafka_broker, state, 2)) and time.monotonic() < deadline:
        time.sleep(0.5)  # the tombstones commit with the next transaction
    assert live == {}, f"{len(live)} retired keys still restore: {sorted(live)[:5]}"
    assert worker.stop() == 0, worker.log_tail()
    assert status["dead_letters"] == {}
