"""The local broker against real clients: kafka-python, aiokafka and a faust-streaming worker."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from aiokafka.structs import TopicPartition as AioTopicPartition
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from stream_rnn.ops.kafka_local import LocalKafka

pytestmark = pytest.mark.kafka

TopicFactory = Callable[..., str]
CONSUME_TIMEOUT_S = 30.0


def _produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]]) -> None:
    """Send (partition, key, value) triples with kafka-python and wait for every ack."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=v, partition=p) for p, k, v in messages]
        for future in futures:
            future.get(timeout=15)
    finally:
        producer.close(timeout=10)


async def _aio_consume(
    bootstrap: str,
    topic: str,
    expected: int,
    *,
    partitions: int,
    group_id: str | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``expected`` records with aiokafka: via a consumer group, or by assigning all partitions."""
    consumer = AIOKafkaConsumer(
        *([topic] if group_id else []),
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        if group_id is None:
            consumer.assign([AioTopicPartition(topic, p) for p in range(partitions)])
            await consumer.seek_to_beginning()
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
        if group_id is not None:
            await consumer.commit()
    finally:
        await consumer.stop()
    return records


def test_broker_serves_metadata(kafka_broker: str, local_kafka: LocalKafka) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        cluster = admin.describe_cluster()
    finally:
        admin.close()
    state = json.loads((local_kafka.data_dir / "broker.json").read_text())
    assert cluster["cluster_id"] == state["cluster_id"]
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [
        ("127.0.0.1", int(kafka_broker.rsplit(":", 1)[1]))
    ]
    status = local_kafka.status()
    assert (status.running, status.accepting, status.formatted) == (True, True, True)
    assert "Kafka Server started" in local_kafka.log_file.read_text()


def test_second_start_reports_the_running_broker(local_kafka: LocalKafka) -> None:
    before = local_kafka.status()
    again = local_kafka.start(timeout=30)
    assert again.already_running
    assert (again.pid, again.bootstrap) == (before.pid, before.bootstrap)


def test_kafka_python_producer_to_aiokafka_group_consumer_keeps_partition_order(
    kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("order", partitions=4)
    messages = [
        (i % 4, f"key-{i % 4}".encode(), json.dumps({"seq": i}).encode()) for i in range(200)
    ]
    _produce(kafka_broker, topic, messages)

    group = f"aio-{secrets.token_hex(4)}"
    records = asyncio.run(_aio_consume(kafka_broker, topic, 200, partitions=4, group_id=group))

    assert len(records) == 200
    by_partition: dict[int, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    for record in records:
        by_partition[record.partition].append(record)
    assert sorted(by_partition) == [0, 1, 2, 3]
    for partition, got in by_partition.items():
        assert [r.offset for r in got] == list(range(50))
        assert [json.loads(r.value)["seq"] for r in got] == list(range(partition, 200, 4))
        assert {r.key for r in got} == {f"key-{partition}".encode()}
    # The group's commit must be visible to another client library.
    checker = KafkaConsumer(bootstrap_servers=kafka_broker, group_id=group)
    try:
        committed = [checker.committed(TopicPartition(topic, p)) for p in range(4)]
    finally:
        checker.close()
    assert committed == [50, 50, 50, 50]


def test_aiokafka_idempotent_producer_to_kafka_python_group_consumer(
    kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("aio-produce", partitions=2)

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker, enable_idempotence=True)
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(topic, f"v{i}".encode(), partition=i % 2)
        finally:
            await producer.stop()

    asyncio.run(produce())
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker,
        group_id=f"kp-{secrets.token_hex(4)}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(CONSUME_TIMEOUT_S * 1000),
    )
    try:
        values: dict[int, list[bytes]] = defaultdict(list)
        for message in consumer:
            values[message.partition].append(message.value)
            if sum(map(len, values.values())) == 20:
                break
        consumer.commit()
        committed = [consumer.committed(TopicPartition(topic, p)) for p in range(2)]
    finally:
        consumer.close()
    assert values == {p: [f"v{i}".encode() for i in range(p, 20, 2)] for p in range(2)}
    assert committed == [10, 10]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stop_restart_and_kill_keep_the_data(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path / "kafka")
    try:
        first = kafka.start()
        admin = KafkaAdminClient(bootstrap_servers=first.bootstrap)
        admin.create_topics([NewTopic("durable", 2, 1)], timeout_ms=10_000)
        admin.close()
        _produce(
            first.bootstrap, "durable", [(i % 2, b"k", f"before-{i}".encode()) for i in range(20)]
        )

        second = kafka.restart()
        assert not second.already_running
        assert (second.bootstrap, second.cluster_id) == (first.bootstrap, first.cluster_id)
        assert second.pid != first.pid
        old = asyncio.run(_aio_consume(second.bootstrap, "durable", 20, partitions=2))
        assert sorted(r.value for r in old) == sorted(f"before-{i}".encode() for i in range(20))

        _produce(second.bootstrap, "durable", [(0, b"k", b"after-restart")])
        assert kafka.kill()  # a crash: no controlled shutdown
        crashed = kafka.status()
        assert (crashed.running, crashed.accepting, crashed.formatted) == (False, False, True)
        assert not (kafka.data_dir / "broker.pid").exists()
        assert not kafka.kill()

        third = kafka.start()
        assert third.bootstrap == first.bootstrap
        everything = asyncio.run(_aio_consume(third.bootstrap, "durable", 21, partitions=2))
        assert len(everything) == 21
        assert b"after-restart" in {r.value for r in everything}
    finally:
        kafka.stop()
    assert not kafka.status().running
    assert not kafka.stop()


FAUST_APP = """
import os

import faust

app = faust.App(
    os.environ["APP_ID"],
    broker="kafka://" + os.environ["BOOTSTRAP"],
    store="memory://",
    topic_partitions=4,
    web_enabled=False,
    datadir=os.environ["DATADIR"],
)
tokens = app.topic(os.environ["IN_TOPIC"], key_type=str, value_type=str)
counts_out = app.topic(os.environ["OUT_TOPIC"], key_type=str, value_type=str)
counts = app.Table("counts", default=int, partitions=4)


@app.agent(tokens)
async def count(stream):
    async for key, value in stream.items():
        counts[key] += 1
        await counts_out.send(key=key, value=f"{key}:{counts[key]}")
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_faust_worker_with_agent_and_table(
    kafka_broker: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    in_topic = topic_factory("faust-in", partitions=4)
    out_topic = topic_factory("faust-out", partitions=4)
    app_id = f"faust-compat-{secrets.token_hex(4)}"
    (tmp_path / "compat_app.py").write_text(FAUST_APP)
    keys = ["k0", "k1", "k2"]
    _produce(
        kafka_broker,
        in_topic,
        [(i % 4, keys[i % 3].encode(), json.dumps(f"tok{i}").encode()) for i in range(12)],
    )

    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "APP_ID": app_id,
        "BOOTSTRAP": kafka_broker,
        "DATADIR": str(tmp_path / "faust-data"),
        "IN_TOPIC": in_topic,
        "OUT_TOPIC": out_topic,
    }
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "compat_app", "worker", "-l", "info"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        consumer = KafkaConsumer(bootstrap_servers=kafka_broker, auto_offset_reset="earliest")
        consumer.assign([TopicPartition(out_topic, p) for p in range(4)])
        outputs: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 90
        while len(outputs) < 12 and time.monotonic() < deadline:
            assert worker.poll() is None, f"faust worker died:\n{worker_log.read_text()[-3000:]}"
            for batch in consumer.poll(timeout_ms=500).values():
                outputs.extend((m.key, m.value) for m in batch)
        consumer.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)

    log_text = worker_log.read_text()
    assert len(outputs) == 12, f"got {outputs}; worker log:\n{log_text[-3000:]}"
    per_key: dict[str, list[str]] = defaultdict(list)
    for key, value in outputs:
        per_key[key.decode()].append(json.loads(value))
    assert per_key == {k: [f"{k}:{n}" for n in range(1, 5)] for k in keys}
    assert "Traceback" not in log_text

    # The Table is backed by a real changelog topic on the broker.
    changelog = f"{app_id}-counts-changelog"
    reader = KafkaConsumer(bootstrap_servers=kafka_broker, auto_offset_reset="earliest")
    try:
        partitions = reader.partitions_for_topic(changelog)
        assert partitions is not None and len(partitions) == 4
        reader.assign([TopicPartition(changelog, p) for p in partitions])
        end = reader.end_offsets([TopicPartition(changelog, p) for p in partitions])
    finally:
        reader.close()
    assert sum(end.values()) == 12
