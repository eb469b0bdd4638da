"""A third-party client (confluent-kafka, i.e. librdkafka) feeds the worker: same results.

The events are written by hand with ``json.dumps``, not with our codec, as any application in
any language would; keys are the sequence keys. Needs the ``confluent-kafka`` dev dependency.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from stream_harness import (
    StreamTopicsFactory,
    WorkerFactory,
    assert_matches_offline,
    count_types,
    expected_count,
    make_model,
)

from stream_rnn.stream.collect import read_predictions, to_lines
from stream_rnn.train.data import records_to_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
FLUSH_S = 30.0


def test_confluent_kafka_producer_feeds_the_worker(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, _, records = make_model(tmp_path, "next-token", 30, seed=9)
    topics = stream_topics(partitions=3)
    worker = worker_factory(model_dir, *topics.worker_args())
    worker.wait_until(lambda s: len(s["assigned"]) == 3, "all 3 partitions assigned")

    producer = Producer({"bootstrap.servers": kafka_broker, "acks": "all", "linger.ms": 5})
    # the order of a live stream: sequences interleaved at random, each key's order kept
    for event in records_to_events(records, level="char", interleave_seed=2):
        wire = {"v": 1, "type": event["type"], "ts": time.time()}
        if event["type"] == "token":
            wire["token"] = event["token"]
        producer.produce(topics.tokens, json.dumps(wire).encode(), key=event["key"].encode())
        producer.poll(0)
    # controls after the recorded sequences: a prompt, a generate from it, then a reset
    for token in "ab":
        producer.produce(
            topics.tokens, json.dumps({"v": 1, "type": "token", "token": token}), key=b"gen"
        )
    producer.produce(
        topics.tokens, json.dumps({"v": 1, "type": "generate", "n": 5, "seed": 3}), key=b"gen"
    )
    producer.produce(topics.tokens, json.dumps({"v": 1, "type": "reset"}), key=b"gen")
    assert producer.flush(FLUSH_S) == 0, "confluent-kafka could not deliver every event"

    total = expected_count("next-token", records)
    preds = read_predictions(
        kafka_broker,
        topics.predictions,
        timeout_s=120,
        max_wait_s=120,
        until=lambda ps: (
            count_types({"next", "end"}, total + 2)(ps)
            and count_types({"generated", "reset"}, 2)(ps)
        ),
    )
    mine = [p for p in preds if p["key"] != "gen"]
    assert_matches_offline(to_lines(mine, "next-token"), model_dir, records)
    assert all(p["latency_s"] is not None and 0 <= p["latency_s"] < 120 for p in mine)
    [generated] = [p for p in preds if p["type"] == "generated"]
    assert generated["key"] == "gen" and len(generated["tokens"]) == 5
    [reset] = [p for p in preds if p["type"] == "reset"]
    assert reset["key"] == "gen" and reset["latency_s"] is None  # the reset had no ts
    status = worker.status()
    assert status is not None and status["dead_letters"] == {}
