"""The bulk consume path on the real broker: flow control bounds it, rebalances leak nothing.

Each test runs faust apps on the bulk path (tests/bulk_consume_app.py) as processes with slow
agents, so that the channel queue is full and the bulk path waits for room most of the time;
their logs say, for every micro-batch the agent took, what was true at that moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka_fixtures import TopicFactory, unique_name
from stream_harness import (
    StreamTopicsFactory,
    WorkerFactory,
    expected_count,
    make_model,
    run_cli,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
APP = Path(__file__).resolve().parents[1] / "bulk_consume_app.py"
PARTITIONS = 4


class App:
    """One bulk_consume_app.py process and its log."""

    def __init__(self, tmp: Path, name: str, bootstrap: str, topic: str, group: str, *args: str):
        self.log = tmp / f"{name}.jsonl"
        self.out = tmp / f"{name}.out"
        argv = [sys.executable, str(APP), "--bootstrap", bootstrap, "--topic", topic,
                "--group", group, "--log", str(self.log), "--datadir", str(tmp / name), *args]  # fmt: skip
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ)

    def lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        text = self.log.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def batches(self) -> list[dict[str, Any]]:
        return [x for x in self.lines() if x["kind"] == "batch"]

    def wait_until(self, check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self) -> str:
        return self.out.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i in range(n):
        producer.send(topic, key=b"key-%d" % (i % 997), value=b'{"v":1,"type":"token","token":"a"}')
    producer.flush(timeout=60)
    producer.close()


def positions(batches: list[dict[str, Any]]) -> dict[int, list[int]]:
    by_partition: dict[int, list[int]] = defaultdict(list)
    for batch in batches:
        for partition, offset, _ in batch["events"]:
            by_partition[partition].append(offset)
    return by_partition


def test_a_slow_agent_keeps_the_bulk_path_within_the_queue_bound(
    tmp_path: Path, kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("bulk-flow", partitions=PARTITIONS)
    n, maxsize, max_poll = 12_000, 200, 500
    produce(kafka_broker, topic, n)
    app = App(tmp_path, "a", kafka_broker, topic, unique_name("bulk-flow"),
              "--maxsize", str(maxsize), "--max-batch", "50", "--delay-s", "0.004",
              "--max-poll-records", str(max_poll))  # fmt: skip
    try:
        app.wait_until(lambda: sum(len(b["events"]) for b in app.batches()) >= n, f"{n} events")
    finally:
        app.stop()
    batches = app.batches()
    # every message once, in order per partition (nothing lost, nothing doubled)
    got = positions(batches)
    assert sum(len(v) for v in got.values()) == n
    assert all(offsets == list(range(len(offsets))) for offsets in got.values()), got.keys()
    for batch in batches:
        stats = batch["stats"]
        assert batch["qsize"] <= maxsize
        # fetched but not yet taken: what the queue holds plus the rest of one fetch, at most
        assert stats["fetched"] - batch["taken"] - stats["abandoned"] <= maxsize + max_poll
    final = batches[-1]["stats"]
    assert final["bulk"] == n and final["stock"] == 0
    assert 0 < final["max_queued"] <= maxsize
    assert final["waits"] > 0  # the slow agent made the bulk path wait for room


def test_a_rebalance_while_the_bulk_path_waits_delivers_nothing_stale(
    tmp_path: Path, kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("bulk-rebalance", partitions=PARTITIONS)
    n = 40_000
    produce(kafka_broker, topic, n)
    group = unique_name("bulk-rebalance")
    args = ("--maxsize", "64", "--max-batch", "32", "--delay-s", "0.01")
    first = App(tmp_path, "first", kafka_broker, topic, group, *args)
    second: App | None = None
    try:
        first.wait_until(lambda: len(first.batches()) >= 50, "50 batches in the first app")
        second = App(tmp_path, "second", kafka_broker, topic, group, *args)  # joins mid-stream
        joined = second

        def both_hold_partitions() -> bool:
            a, b = first.batches(), joined.batches()
            return bool(a and b and a[-1]["assignment"] and len(b) >= 20)

        joined.wait_until(both_hold_partitions, "both apps taking events")

        def all_taken() -> bool:
            seen = {(p, o) for app in (first, joined) for b in app.batches()
                    for p, o, _ in b["events"]}  # fmt: skip
            return len(seen) == n

        joined.wait_until(all_taken, f"all {n} messages taken by the two apps", timeout_s=180)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert second is not None
    revocations = [x for x in first.lines() if x["kind"] == "revoked" and x["partitions"]]
    assert revocations, "the second app's join did not revoke the first app's partitions"
    for app in (first, second):
        for batch in app.batches():
            # Taken while the consumer's flow ran (a revocation stops it and clears the queue in
            # one step; the next assignment resumes it), all of the group generation of that
            # moment, all of partitions assigned then: no stale copy reached the agent.
            stale = [e for e in batch["events"] if e[2] != batch["generation"]]
            foreign = [e for e in batch["events"] if e[0] not in batch["assignment"]]
            assert batch["flow"], batch
            assert not stale, (batch["generation"], stale[:5])
            assert not foreign, (batch["assignment"], foreign[:5])
    final = first.batches()[-1]["stats"]
    # a revocation found the bulk path waiting for room in the full queue, and ended that wait
    assert final["waits_cleared"] >= 1, final
    assert final["abandoned"] > 0 and final["stock"] == 0


def test_the_worker_takes_its_tokens_in_bulk(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, data, records = make_model(tmp_path, "next-token", 12, seed=3)
    topics = stream_topics(partitions=PARTITIONS)
    worker = worker_factory(model_dir, *topics.worker_args(), "--max-batch", "64")
    worker.wait_until(lambda s: len(s["assigned"]) == PARTITIONS, "all partitions assigned")
    run_cli("produce", "--data", str(data), "--bootstrap", kafka_broker, "--topic", topics.tokens)
    total = expected_count("next-token", records)
    worker.wait_until(lambda s: s["predictions"] >= total, f"{total} predictions")
    status = worker.status()
    assert status is not None
    consume = status["consume"]
    # every message the worker handled came through the bulk path, none through faust's own
    assert consume["bulk"] >= status["messages"] > 0 and consume["stock"] == 0, consume
    assert worker.stop() == 0
