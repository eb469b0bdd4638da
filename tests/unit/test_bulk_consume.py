"""BulkConsumer's delivery step on real faust objects (app, conductor, channel queue), no broker.

The drain loop's fetch is faust's own; what is tested here is what happens to fetched records:
order, the queue's maxsize, and rebalances that start while the bulk path waits for room (the
same synchronous steps faust's ``App._on_partitions_revoked`` takes). The real-broker tests
(tests/integration/test_bulk_consume_broker.py) run the whole loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.exceptions import ValueDecodeError
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP

from stream_rnn.stream import faust_boundary as fb
from stream_rnn.stream.exceptions import StreamError

TOPIC = "tokens"


@dataclass
class Rig:
    app: faust.App
    consumer: fb.BulkConsumer
    queue: Any
    channels: dict[str, Any]

    def records(self, partition: int, offsets: range, topic: str = TOPIC) -> list[Any]:
        return [
            ConsumerRecord(topic, partition, o, 1000 * o, 0, b"k%d" % o, b"v%d" % o, None, 2, 2, ())
            for o in offsets
        ]

    def revoke(self) -> None:
        """What faust's App._on_partitions_revoked does in one synchronous step."""
        assignment = set(self.consumer._get_active_partitions())
        self.consumer.stop_flow()
        self.app.flow_control.suspend()
        self.consumer.pause_partitions(assignment)
        self.app.flow_control.clear()

    def drain(self) -> list[tuple[int, int, int]]:
        out = []
        while not self.queue.empty():
            m = self.queue.get_nowait().message
            out.append((m.partition, m.offset, m.generation_id))
        return out


async def rig(
    maxsize: int = 100, *, value_serializer: str = "raw", other_topic: bool = False
) -> Rig:
    app = faust.App(
        f"bulk-{secrets.token_hex(3)}",
        broker="kafka://127.0.0.1:1",
        autodiscover=False,
        stream_buffer_maxsize=maxsize,
    )
    names = [TOPIC, "other"] if other_topic else [TOPIC]
    topics = {
        name: app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer=value_serializer,
            acks=False,
        )
        for name in names
    }
    fb.use_bulk_consumer(app, [TOPIC])
    consumer = app.consumer
    assert isinstance(consumer, fb.BulkConsumer)
    # what an agent does when it starts iterating: its channel joins the conductor
    channels = {name: topic.__aiter__() for name, topic in topics.items()}
    assigned = {TP(name, p) for name in names for p in range(2)}
    await app.topics.on_partitions_assigned(assigned)
    consumer._set_active_tps(assigned)
    app.consumer_generation_id = 3
    app.flow_control.resume()
    consumer.resume_flow()
    consumer.highwater = lambda tp: 0  # type: ignore[method-assign] # not connected
    return Rig(app, consumer, channels[TOPIC].queue, channels)


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


def test_fetched_records_reach_the_queue_in_order_in_bulk() -> None:
    async def main() -> tuple[Rig, list[tuple[int, int, int]]]:
        r = await rig()
        records = {TopicPartition(TOPIC, 0): r.records(0, range(5)),
                   TopicPartition(TOPIC, 1): r.records(1, range(10, 15))}  # fmt: skip
        await r.consumer._deliver(records, r.consumer._get_active_partitions(), 3)
        return r, r.drain()

    r, got = run(main)
    assert sorted(got) == [(0, o, 3) for o in range(5)] + [(1, o, 3) for o in range(10, 15)]
    assert [o for p, o, _ in got if p == 0] == list(range(5))  # per-partition order kept
    stats = r.consumer.bulk_stats
    assert (stats.fetched, stats.bulk, stats.stock, stats.abandoned) == (10, 10, 0, 0)
    assert r.consumer._read_offset[TP(TOPIC, 1)] == 14
    # the pressure callbacks left faust's active partitions valid (faust TP objects only)
    assert r.consumer._get_active_partitions()


def test_the_queue_never_holds_more_than_its_maxsize() -> None:
    async def main() -> tuple[Rig, list[int], list[int]]:
        r = await rig(maxsize=8)
        sizes: list[int] = []
        offsets: list[int] = []

        async def slow_reader() -> None:
            while len(offsets) < 100:
                sizes.append(r.queue.qsize())
                offsets.append((await r.queue.get()).message.offset)
                await asyncio.sleep(0.001)

        reader = asyncio.create_task(slow_reader())
        await r.consumer._deliver(
            {TopicPartition(TOPIC, 0): r.records(0, range(100))},
            r.consumer._get_active_partitions(),
            3,
        )
        await asyncio.wait_for(reader, 10)
        return r, sizes, offsets

    r, sizes, offsets = run(main)
    assert offsets == list(range(100))
    assert max(sizes) <= 8
    assert r.consumer.bulk_stats.max_queued <= 8
    assert r.consumer.bulk_stats.waits > 0  # it did wait for room: backpressure engaged


def test_a_revocation_while_waiting_for_room_ends_the_wait_and_leaks_nothing() -> None:
    async def main() -> tuple[Rig, bool, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        r = await rig(maxsize=4)
        r.consumer.poll_s = 60.0  # only the revocation's clear can end the wait in time
        deliver = asyncio.create_task(
            r.consumer._deliver_bulk(
                TP(TOPIC, 0),
                r.channels[TOPIC],
                r.records(0, range(20)),
                r.consumer._get_active_partitions(),
                3,
            )
        )
        while not r.consumer.bulk_stats.waits:
            await asyncio.sleep(0.001)
        r.revoke()
        done = await asyncio.wait_for(deliver, 2.0)  # no deadlock
        after_clear = r.drain()
        # the next assignment: flow resumes in a new generation; nothing of the old one appears
        r.app.consumer_generation_id = 4
        r.app.flow_control.resume()
        r.consumer.resume_flow()
        for _ in range(20):
            await asyncio.sleep(0)
        return r, done, after_clear, r.drain()

    r, done, after_clear, later = run(main)
    assert done is False
    assert after_clear == [] and later == []
    stats = r.consumer.bulk_stats
    assert (stats.bulk, stats.abandoned, stats.waits_cleared) == (4, 16, 1)


def test_room_made_in_the_same_step_as_the_revocation_is_not_used() -> None:
    # A reader takes an event (waking the waiting bulk path) and the revocation runs before the
    # bulk path resumes: a blocked put() would now land its event after the clear.
    async def main() -> tuple[bool, list[tuple[int, int, int]]]:
        r = await rig(maxsize=4)
        deliver = asyncio.create_task(
            r.consumer._deliver_bulk(
                TP(TOPIC, 0),
                r.channels[TOPIC],
                r.records(0, range(20)),
                r.consumer._get_active_partitions(),
                3,
            )
        )
        while not r.consumer.bulk_stats.waits:
            await asyncio.sleep(0.001)
        r.queue.get_nowait()
        r.revoke()
        done = await asyncio.wait_for(deliver, 2.0)
        return done, r.drain()

    done, left = run(main)
    assert done is False
    assert left == []


def test_records_of_an_earlier_generation_are_not_delivered() -> None:
    async def main() -> tuple[Rig, list[tuple[int, int, int]]]:
        r = await rig()
        r.app.consumer_generation_id = 5  # a rebalance completed while the fetch was under way
        await r.consumer._deliver(
            {TopicPartition(TOPIC, 0): r.records(0, range(5))},
            r.consumer._get_active_partitions(),
            4,
        )
        return r, r.drain()

    r, got = run(main)
    assert got == []


def test_suspended_flow_control_waits_instead_of_dropping() -> None:
    async def main() -> list[tuple[int, int, int]]:
        r = await rig()
        r.consumer.poll_s = 0.01
        r.app.flow_control.suspend()  # the consumer's own flow is active: faust would wait too
        deliver = asyncio.create_task(
            r.consumer._deliver(
                {TopicPartition(TOPIC, 0): r.records(0, range(5))},
                r.consumer._get_active_partitions(),
                3,
            )
        )
        await asyncio.sleep(0.1)
        assert r.queue.empty() and not deliver.done()
        r.app.flow_control.resume()
        await asyncio.wait_for(deliver, 2.0)
        return r.drain()

    assert run(main) == [(0, o, 3) for o in range(5)]


def test_a_paused_partition_is_skipped() -> None:
    async def main() -> tuple[Rig, list[tuple[int, int, int]]]:
        r = await rig()
        r.consumer.pause_partitions([TP(TOPIC, 1)])
        await r.consumer._deliver(
            {
                TopicPartition(TOPIC, 1): r.records(1, range(5)),
                TopicPartition(TOPIC, 0): r.records(0, range(2)),
            },  # fmt: skip
            r.consumer._get_active_partitions(),
            3,
        )
        return r, r.drain()

    r, got = run(main)
    assert got == [(0, 0, 3), (0, 1, 3)]


def test_other_topics_take_fausts_own_path() -> None:
    async def main() -> tuple[Rig, list[int]]:
        r = await rig(other_topic=True)
        await r.consumer._deliver(
            {TopicPartition("other", 0): r.records(0, range(3), topic="other")},
            r.consumer._get_active_partitions(),
            3,
        )
        queue = r.channels["other"].queue
        return r, [queue.get_nowait().message.offset for _ in range(queue.qsize())]

    r, offsets = run(main)
    assert offsets == [0, 1, 2]
    assert (r.consumer.bulk_stats.bulk, r.consumer.bulk_stats.stock) == (0, 3)


def test_a_decode_error_goes_to_the_channel_the_faust_way() -> None:
    async def main() -> tuple[Rig, list[int], BaseException | None]:
        r = await rig(value_serializer="json")
        records = [
            ConsumerRecord(TOPIC, 0, o, 0, 0, b"k", value, None, 1, len(value), ())
            for o, value in enumerate([b'"a"', b"{not json", b'"c"'])
        ]
        await r.consumer._deliver(
            {TopicPartition(TOPIC, 0): records}, r.consumer._get_active_partitions(), 3
        )
        error = None
        try:
            r.queue.get_nowait()
        except ValueDecodeError as err:  # faust throws it into the channel first
            error = err
        return r, [r.queue.get_nowait().message.offset for _ in range(r.queue.qsize())], error

    r, offsets, error = run(main)
    assert isinstance(error, ValueDecodeError)
    assert offsets == [0, 2]
    assert (r.consumer.bulk_stats.bulk, r.consumer.bulk_stats.stock) == (2, 1)


def test_use_bulk_consumer_only_before_the_consumer_exists() -> None:
    app = faust.App("bulk-late", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert fb.bulk_stats(app) is None
    app.consumer  # noqa: B018 - created here
    with pytest.raises(StreamError, match="before the app starts"):
        fb.use_bulk_consumer(app, [TOPIC])


def test_use_bulk_consumer_needs_fausts_own_aiokafka_transport() -> None:
    class OtherTransport(AIOKafkaTransport):
        pass  # someone else's consumer class: the bulk consumer would replace it silently

    app = faust.App("bulk-other", broker="kafka://127.0.0.1:1", autodiscover=False)
    app.transport = OtherTransport(app.conf.broker_consumer, app)
    with pytest.raises(StreamError, match="aiokafka transport"):
        fb.use_bulk_consumer(app, [TOPIC])


def test_bulk_topics_accumulate() -> None:
    app = faust.App("bulk-twice", broker="kafka://127.0.0.1:1", autodiscover=False)
    fb.use_bulk_consumer(app, ["a"])
    fb.use_bulk_consumer(app, ["b"])
    consumer = app.consumer
    assert isinstance(consumer, fb.BulkConsumer)
    assert consumer.bulk_topics == {"a", "b"}
    assert fb.bulk_stats(app) == fb.BulkStats()


def test_a_pressure_drop_wakes_a_drain_loop_whose_partitions_are_all_paused() -> None:
    # faust pauses a partition whose queue is under high pressure; with every partition paused
    # its _wait_next_records would sleep a whole second while the agent drains the queue.
    async def main() -> tuple[bool, float, bool]:
        r = await rig(maxsize=10)
        active = r.consumer._get_active_partitions()
        records = {TopicPartition(TOPIC, 0): r.records(0, range(9)),
                   TopicPartition(TOPIC, 1): r.records(1, range(1))}  # fmt: skip
        await r.consumer._deliver(records, active, 3)
        paused = not r.consumer._get_active_partitions()
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(r.consumer._wait_for_pressure_drop())
        await asyncio.sleep(0.05)
        started = loop.time()
        r.drain()  # the agent takes the events: the pressure drops
        await asyncio.wait_for(waiting, 1.0)
        return paused, loop.time() - started, bool(r.consumer._get_active_partitions())

    paused, woke_after, resumed = run(main)
    assert paused and resumed
    assert woke_after < 0.2
