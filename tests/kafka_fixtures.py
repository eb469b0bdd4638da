"""Fixtures for tests against a real local Apache Kafka broker (KRaft, one node).

A pytest plugin (registered by ``tests/conftest.py``), so that ``tests/integration`` and
``tests/chaos`` share one session broker. ``kafka_broker`` starts one broker per test session
in a temporary data dir on free loopback ports and yields its bootstrap address;
``topic_factory`` creates uniquely named topics on it; ``stream_topics`` and ``worker_factory``
give a test its own stream topics and worker processes. Tests that use the broker are marked
``kafka`` automatically, so ``-m "not kafka"`` skips them.

Example::

    def test_roundtrip(kafka_broker: str, topic_factory: TopicFactory) -> None:
        topic = topic_factory(partitions=4)
        KafkaProducer(bootstrap_servers=kafka_broker).send(topic, b"x").get(timeout=10)
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError
from stream_harness import StreamTopics, StreamTopicsFactory, WorkerFactory, WorkerProcess

from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import find_free_port

TOPIC_READY_TIMEOUT_S = 15.0


class TopicFactory(Protocol):
    """Creates a topic with a random suffix and returns its name once every partition has a leader."""

    def __call__(
        self, prefix: str = "test", *, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str: ...


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix, for topics and consumer groups that no test shares."""
    return f"{prefix}-{secrets.token_hex(4)}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"kafka_broker", "local_kafka"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """The session's broker handle (for tests that need its pid, status or logs)."""
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka-session"))
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_broker(local_kafka: LocalKafka) -> str:
    """Bootstrap address (``127.0.0.1:PORT``) of the session's broker."""
    bootstrap = local_kafka.status().bootstrap
    assert bootstrap is not None, "the session broker has no recorded address"
    return bootstrap


@pytest.fixture
def topic_factory(kafka_broker: str) -> Iterator[TopicFactory]:
    """Creates topics with unique names; deletes them after the test."""
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-topic-factory")
    created: list[str] = []

    def create(
        prefix: str = "test", *, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        name = unique_name(prefix)
        topic = NewTopic(name, partitions, 1, topic_configs=config or {})
        admin.create_topics([topic], timeout_ms=10_000)
        created.append(name)
        _wait_for_leaders(admin, name, partitions)
        return name

    try:
        yield create
    finally:
        admin.close()
        if created:
            # a fresh client: the test may have restarted the broker under the first one
            cleaner = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-cleanup")
            try:
                cleaner.delete_topics(created, timeout_ms=10_000)
            except KafkaError as error:  # cleanup only; the test result stands
                warnings.warn(f"could not delete test topics {created}: {error}", stacklevel=1)
            finally:
                cleaner.close()


def _wait_for_leaders(admin: KafkaAdminClient, topic: str, partitions: int) -> None:
    # create_topics returns once the controller accepted the topic; producers sent before
    # the broker has loaded the leaders would see (retriable) NOT_LEADER errors.
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    while True:
        described = admin.describe_topics([topic])[0]
        # kafka-python 3 names the field leader_id, 2.x leader.
        leaders = [p.get("leader_id", p.get("leader", -1)) for p in described.get("partitions", [])]
        if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topic {topic} has no leader for all {partitions} partitions")
        time.sleep(0.1)


# --------------------------------------------------------------------------- stream workers
@pytest.fixture
def stream_topics(kafka_broker: str) -> Iterator[StreamTopicsFactory]:
    made: list[StreamTopics] = []

    def make(*, partitions: int = 4) -> StreamTopics:
        topics = StreamTopics(
            unique_name("tokens"), unique_name("predictions"), unique_name("dead"), partitions
        )
        made.append(topics)
        return topics

    yield make
    names = [
        n for t in made for n in (t.tokens, f"{t.tokens}-state", t.predictions, t.dead_letters)
    ]
    if names:
        admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-stream-topics")
        try:
            existing = set(admin.list_topics())
            if existing & set(names):
                admin.delete_topics(sorted(existing & set(names)), timeout_ms=10_000)
        except KafkaError as error:  # cleanup only; the test result stands
            warnings.warn(f"could not delete stream topics {names}: {error}", stacklevel=1)
        finally:
            admin.close()


@pytest.fixture
def worker_factory(kafka_broker: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Worker processes of one test; every one still running afterwards is stopped (or killed)."""
    started: list[WorkerProcess] = []
    base_env = {
        "STREAM_RNN_WORKER_DIR": str(tmp_path / "workers"),
        "OMP_NUM_THREADS": "1",  # two cores: broker, workers and the test share them
        "STREAM_RNN_STATS_INTERVAL_S": "5",
    }

    def start(
        model_dir: Path,
        *args: str,
        group: str | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        taken = frozenset(w.port for w in started)
        port = find_free_port(exclude=taken)
        log = tmp_path / f"worker-{len(started)}.log"
        argv = ["--model", str(model_dir), "--bootstrap", kafka_broker]
        argv += ["--group", group or unique_name("group"), *args]
        worker = WorkerProcess(argv, port, log, {**base_env, **(env or {})})
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
