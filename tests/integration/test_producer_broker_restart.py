"""`stream-rnn produce` rides out a broker restart: every event arrives once, in order per key.

The CLI runs as a subprocess, rate-limited so that it is still sending when the session
broker is stopped (SIGTERM) and, 5 s later, started again on the same port and data. The
idempotent producer retries through the outage; the topic read back from the beginning must
hold exactly the events `records_to_events` yields, each key's in order, and the command must
exit 0 (a lost event would make it exit non-zero with the count).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from kafka_fixtures import TopicFactory, unique_name
from stream_harness import REPO

from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.stream.codec import decode_event, decode_key
from stream_rnn.stream.messages import EndEvent, TokenEvent
from stream_rnn.train.data import Record, records_to_events, write_records

pytestmark = pytest.mark.slow

N_KEYS = 30
SEQS_PER_KEY = 3  # a key's later sequences must follow its earlier ones
RATE = 250.0  # tokens/s: ~12 s of sending for ~3000 tokens
INTERLEAVE_SEED = 5
STOP_AFTER_EVENTS = 400  # stop the broker once this many arrived: mid-stream, not before
DOWN_S = 5.0
PRODUCE_TIMEOUT_S = 180.0

Seen = tuple[str, str | int | None]  # (event type, token)


def _records(seed: int = 0) -> list[Record]:
    rng = random.Random(seed)  # noqa: S311 - test data
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        Record(f"key-{k:02d}", text="".join(rng.choices(letters, k=rng.randint(20, 45))))
        for _ in range(SEQS_PER_KEY)
        for k in range(N_KEYS)
    ]


def _consumer(bootstrap: str, topic: str) -> tuple[KafkaConsumer, list[TopicPartition]]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="tests-producer-restart",
    )
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    assert parts, f"topic {topic} has no partitions"
    consumer.assign(parts)
    return consumer, parts


def _arrived(bootstrap: str, topic: str) -> int:
    consumer, parts = _consumer(bootstrap, topic)
    try:
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


def _read_all(bootstrap: str, topic: str, timeout_s: float = 60.0) -> dict[str, list[Seen]]:
    """Every event of ``topic`` (from the beginning to the end offsets), by key, in order."""
    consumer, parts = _consumer(bootstrap, topic)
    try:
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        by_key: dict[str, list[Seen]] = defaultdict(list)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in parts):
            assert time.monotonic() < deadline, f"could not read {topic} to {end}"
            for batch in consumer.poll(timeout_ms=500).values():
                for msg in batch:
                    event = decode_event(msg.value)
                    token = event.token if isinstance(event, TokenEvent) else None
                    kind = "token" if isinstance(event, TokenEvent) else "end"
                    assert isinstance(event, TokenEvent | EndEvent), event
                    by_key[decode_key(msg.key)].append((kind, token))
        return dict(by_key)
    finally:
        consumer.close()


@pytest.fixture
def extra_topics(kafka_broker: str) -> Iterator[list[str]]:
    """Names of topics the CLI creates besides the tokens topic; deleted after the test."""
    names: list[str] = []
    yield names
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-producer-restart")
    try:
        existing = set(admin.list_topics()) & set(names)
        if existing:
            admin.delete_topics(sorted(existing), timeout_ms=10_000)
    except KafkaError as error:  # cleanup only; the test result stands
        print(f"could not delete {names}: {error}")
    finally:
        admin.close()


def test_produce_survives_a_broker_restart(
    kafka_broker: str,
    local_kafka: LocalKafka,
    topic_factory: TopicFactory,
    extra_topics: list[str],
    tmp_path: Path,
) -> None:
    topic = topic_factory("produce-restart", partitions=4)
    predictions, dead = unique_name("pred"), unique_name("dead")
    extra_topics += [f"{topic}-state", predictions, dead]  # `produce` ensures the stream topics
    records = _records()
    data = tmp_path / "records.jsonl"
    write_records(data, records)
    expected: dict[str, list[Seen]] = defaultdict(list)
    for ev in records_to_events(records, level="char", interleave_seed=INTERLEAVE_SEED):
        expected[ev["key"]].append((ev["type"], ev.get("token")))
    n_events = sum(map(len, expected.values()))

    log_path = tmp_path / "produce.log"
    env = {
        **os.environ,
        "STREAM_RNN_PREDICTIONS_TOPIC": predictions,
        "STREAM_RNN_DEAD_LETTER_TOPIC": dead,
        "OMP_NUM_THREADS": "1",
    }
    args = ["--data", str(data), "--bootstrap", kafka_broker, "--topic", topic]
    args += ["--rate", str(RATE), "--interleave-seed", str(INTERLEAVE_SEED), "--level", "char"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own module, argument list
            [sys.executable, "-m", "stream_rnn", "produce", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while (arrived := _arrived(kafka_broker, topic)) < STOP_AFTER_EVENTS:
            assert proc.poll() is None, f"produce ended early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"only {arrived} events arrived in 60 s"
            time.sleep(0.2)
        try:
            assert local_kafka.stop(), "the session broker was not running"
            stopped_at = time.monotonic()
            time.sleep(DOWN_S)
        finally:
            restarted = local_kafka.start()  # the same port and data; a no-op if it runs
        assert restarted.bootstrap == kafka_broker
        back_after = time.monotonic() - stopped_at
        still_sending = proc.poll() is None
        rc = proc.wait(timeout=PRODUCE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert rc == 0, f"stream-rnn produce exited {rc}:\n{output}"
    assert still_sending, "produce finished before the broker came back: nothing was tested"
    assert f"sent {n_events} events" in output, output

    got = _read_all(kafka_broker, topic)
    print(
        f"\nproduce through a broker restart: {n_events} events, stopped after {arrived}, "
        f"broker back after {back_after:.1f}s; read back {sum(map(len, got.values()))}"
    )
    assert sorted(got) == sorted(expected)
    for key, events in expected.items():
        assert got[key] == events, f"key {key}: {len(got[key])} events, expected {len(events)}"
