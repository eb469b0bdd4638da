"""Every use of a faust-streaming internal, in one place (an anti-corruption layer).

The worker needs five things faust does not offer as public API; each is wrapped here, and
``tests/unit/test_faust_contract.py`` fails loudly if an upgrade changes one of them:

* ``channel_queue(stream)``: the agent channel's queue, to take micro-batches in bulk
  (`stream_rnn.stream.batches`) instead of faust's per-message iterator;
* ``use_bulk_consumer(app, topics)``: a consumer whose drain loop hands whole fetched record
  batches of ``topics`` to the agent's queue (`BulkConsumer`), instead of one ``wait_first``
  (four tasks and an ``asyncio.wait``) per message;
* ``commit_offsets(app, topic, offsets)``: faust's consumer commit path without its ack
  bookkeeping (at-least-once: offsets are committed after the checkpoint, acks are off);
* ``generation_id(app)`` and ``event_generation(event)``: the consumer group generation now and
  the one an event was fetched in (events of an earlier generation are stale copies);
* ``event_position(event)``: partition and offset of the event's message.

faust-streaming and aiokafka are pinned to the tested minor versions in ``pyproject.toml``;
`check_versions` says which ones were tested.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any, cast

import faust
from faust.serializers.registry import Registry
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaDriverConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, EventT, StreamT
from mode import Service, ServiceT
from prometheus_client import CollectorRegistry

from stream_rnn.stream.batches import EventQueue
from stream_rnn.stream.exceptions import StreamError

TESTED = {"faust-streaming": "0.15.", "aiokafka": "0.14."}


def check_versions() -> list[str]:
    """Installed packages whose version is not the tested minor one (empty when all are)."""
    return [
        f"{name} {version(name)} (tested: {prefix}x)"
        for name, prefix in TESTED.items()
        if not version(name).startswith(prefix)
    ]


def channel_queue(stream: StreamT[Any]) -> EventQueue[EventT]:
    """The queue faust's conductor fills for this agent's stream (a ``ThrowableQueue``)."""
    return cast(EventQueue[EventT], cast(Any, stream).channel.queue)


async def commit_offsets(app: faust.App, topic: str, offsets: dict[int, int]) -> bool:
    """Commit ``{partition: next offset}`` of ``topic`` through faust's consumer; True if done.

    Offsets of partitions no longer assigned are left out by faust (their new owner redoes
    them).
    """
    tps = {TP(topic, p): off for p, off in offsets.items()}
    return bool(await cast(FaustConsumer, app.consumer)._commit_offsets(tps))


def generation_id(app: faust.App) -> int | None:
    """The consumer group generation faust's consumer is in now (None before the first)."""
    return cast(int | None, app.consumer_generation_id)


def event_generation(event: EventT) -> int | None:
    """The group generation the event's message was fetched in (None: unknown)."""
    return cast(int | None, getattr(event.message, "generation_id", None))


def event_position(event: EventT) -> tuple[int, int]:
    """``(partition, offset)`` of the event's message."""
    return event.message.partition, event.message.offset


# --------------------------------------------------------------------------- bulk consume path
@dataclass
class BulkStats:
    """What the drain loop did, in messages (for the status endpoint, tests and benchmarks)."""

    fetched: int = 0  # records fetched for the bulk topics
    bulk: int = 0  # put into a channel queue by the bulk path
    stock: int = 0  # handed to faust's own per-message path (other topics, decode errors)
    abandoned: int = 0  # fetched, not delivered: the flow stopped, or the partition paused
    waits: int = 0  # times the bulk path waited for room in a full queue or for flow control
    waits_cleared: int = 0  # waits for room ended by a queue clear (revocation, shutdown)
    paused_waits: int = 0  # waits for a queue's pressure to drop (every partition paused)
    max_queued: int = 0  # the most events a bulk-fed queue held right after a delivery

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_GO, _WAIT, _SKIP, _ABANDON = range(4)
_FAILED = object()


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """The coroutine's result if it completes without suspending; else `_FAILED` (closed).

    faust's compiled ``Topic.decode`` never awaits on success; an exception (a decode error)
    or a wish to wait leaves the message to faust's own path, which handles both its way.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    except Exception:  # noqa: BLE001 - faust's callback redoes it and handles the error
        return _FAILED
    coro.close()
    return _FAILED


class BulkConsumer(AIOKafkaDriverConsumer):
    """faust's aiokafka consumer with a bulk drain loop for the topics in ``bulk_topics``.

    faust's ``Consumer._drain_messages`` awaits ``wait_first(callback(message),
    suspend_flow.wait())`` per message: four tasks and an ``asyncio.wait`` each, most of a
    faust agent's cost. For a partition of a bulk topic consumed by exactly one channel (and
    without faust acks), this loop puts the fetched records into that channel's queue in
    chunks instead: decoded as the channel decodes them (``Topic.decode``, or its exact
    equivalent for raw bytes), with the conductor's queue pressure callbacks, never beyond the
    queue's ``maxsize``. Every other record goes through a copy of faust's per-message path
    (``_deliver_stock``), as before. A slow agent keeps its queue full: the conductor's pressure
    callbacks pause the partitions, and the loop resumes on the pressure drop (faust's own loop
    would sleep a second).

    Rebalance safety rests on one rule: records are checked and put into the queue in one
    synchronous step, with no ``await`` in between. The check is the one faust's ``getmany``
    makes (consumer flow active, group generation unchanged, partition active) plus faust's
    flow control. Revocation stops the flow and clears every channel queue in one synchronous
    step too (``App._on_partitions_revoked``: ``stop_flow``, ``flow_control.suspend``,
    ``flow_control.clear``), so each chunk is either put before it (and cleared by it) or not
    put at all: after revocation, no event of the old generation reaches a queue. The loop
    never holds anything the rebalance waits for: waiting for room in a full queue is a future
    in the queue's putters, which the clear cancels (and a timeout re-checks the flow anyway),
    never a blocked ``put`` that would land its event after the clear.

    Example::

        app = faust.App("g", broker="kafka://127.0.0.1:9092")
        use_bulk_consumer(app, ["tokens"])   # before the app starts
    """

    #: records put into a queue per synchronous step, at most (the loop yields in between)
    chunk = 1024
    #: while waiting for room or for flow control: how often the flow is checked again
    poll_s = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bulk_topics: frozenset[str] = cast(BulkTransport, self.transport).bulk_topics
        self.bulk_stats = BulkStats()
        self._pressure: dict[TP, tuple[Callable[[], None], Callable[[], None]]] = {}
        self._pressure_dropped = asyncio.Event()

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        # faust's loop (transport/consumer.py, Consumer._drain_messages and getmany), with the
        # per-record delivery replaced by `_deliver`.
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if not self.should_stop:
                    await self._wait_for_pressure_drop()
                    records, active = await self._wait_next_records(1.0)
                    generation = self.app.consumer_generation_id
                    if records is not None and not self.should_stop:
                        if self.flow_active:
                            await self._deliver(records, active, generation)
                        else:
                            await self._seek_back()
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _wait_for_pressure_drop(self) -> None:
        # Every partition is paused because its queue is under high pressure (the conductor's
        # on_pressure_high): faust's _wait_next_records would sleep a whole second, and a slow
        # agent would drain its queue and starve meanwhile. Wait for the drop instead.
        if self._buffered_partitions and not self._get_active_partitions():
            self.bulk_stats.paused_waits += 1
            self._pressure_dropped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pressure_dropped.wait(), 1.0)

    def on_buffer_drop(self, tp: TP) -> None:
        super().on_buffer_drop(tp)
        self._pressure_dropped.set()

    async def _seek_back(self) -> None:
        # faust's getmany when the flow stopped during the fetch: back to the committed offsets
        try:
            await self.perform_seek()
        except Exception as exc:  # noqa: BLE001 - as faust: logged, the next fetch goes on
            self.log.warning(f"exception performing seek when flow not active {exc}")

    async def _deliver(
        self, records: Mapping[TP, Sequence[Any]], active: set[TP] | None, generation: int
    ) -> None:
        stats = self.bulk_stats
        bulk_topics = self.bulk_topics
        stats.fetched += sum(len(b) for tp, b in records.items() if tp.topic in bulk_topics)
        items = list(records.items())
        for index, (tp, batch) in enumerate(items):
            state = self._flow(tp, active, generation)
            if state == _ABANDON:
                stats.abandoned += sum(len(b) for t, b in items[index:] if t.topic in bulk_topics)
                return
            channel = self._bulk_channel(tp)
            if state == _SKIP:
                stats.abandoned += len(batch) if channel is not None else 0
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            if channel is None:
                done = await self._deliver_stock(tp, batch, active, generation)
            else:
                done = await self._deliver_bulk(tp, channel, batch, active, generation)
            if not done:
                stats.abandoned += sum(
                    len(b) for t, b in items[index + 1 :] if t.topic in bulk_topics
                )
                return

    def _flow(self, tp: TP, active: set[TP] | None, generation: int) -> int:
        """May records of ``tp`` fetched in ``generation`` go to the streams now?"""
        if (
            not self.flow_active
            or self.should_stop
            or self.app.consumer_generation_id != generation
        ):
            return _ABANDON  # a rebalance (or shutdown) began: faust drops the rest too
        if active is not None and tp not in active and tp not in self._buffered_partitions:
            return _SKIP  # paused or revoked: as faust's getmany
        if not self.app.flow_control.is_active():
            return _WAIT  # the conductor would wait in flow_control.acquire()
        return _GO

    def _bulk_channel(self, tp: TP) -> Any | None:
        """The one channel consuming ``tp``, if the bulk path may feed it; else None."""
        if tp.topic not in self.bulk_topics or self.app.topics.acks_enabled_for(tp.topic):
            return None
        channels = cast(Any, self.app.topics)._tp_index.get(tp)
        if not channels or len(channels) != 1:
            return None
        return next(iter(channels))

    async def _deliver_bulk(
        self,
        tp: TP,
        channel: Any,
        records: Sequence[Any],
        active: set[TP] | None,
        generation: int,
    ) -> bool:
        """Put ``records`` into ``channel``'s queue in chunks; False if the flow stopped."""
        queue = channel.queue
        maxsize = queue.maxsize
        decode = channel.decode
        raw_event = self._raw_event_factory(channel)
        to_message = self._to_message
        put = queue.put_nowait_enhanced
        on_high, on_drop = self._pressure_callbacks(tp)
        read_offset = self._read_offset
        wait_until_ebb = self.app.producer.buffer.wait_until_ebb
        stats = self.bulk_stats
        i, n = 0, len(records)
        while i < n:
            await wait_until_ebb()  # faust's producer buffer (tables): returns at once if low
            # ---- from here to the end of the chunk: no await (see the class docstring)
            state = self._flow(tp, active, generation)
            if state == _ABANDON:
                stats.abandoned += n - i
                return False
            if state == _SKIP:
                stats.abandoned += n - i
                return True
            room = maxsize - queue.qsize() if maxsize > 0 else n - i
            if state == _WAIT or room <= 0:
                await self._wait_for_room(queue)
                continue
            stop = min(n, i + min(room, self.chunk))
            r_offset = read_offset[tp]
            last = failed = None
            put_here = 0
            while i < stop:
                record = records[i]
                i += 1
                offset = record.offset
                if r_offset is not None and offset < r_offset:
                    continue  # read before: faust's drain loop drops these too
                message = to_message(tp, record)
                if raw_event is not None:
                    event = raw_event(message)
                else:
                    event = _run_now(decode(message, propagate=True))
                if event is _FAILED:
                    failed = message
                    break
                message.incref()
                put(event, on_pressure_high=on_high, on_pressure_drop=on_drop)
                last = offset
                put_here += 1
            if last is not None:
                read_offset[tp] = last
            stats.bulk += put_here
            stats.max_queued = max(stats.max_queued, queue.qsize())
            # ---- end of the synchronous step
            if failed is not None:
                if not await self._deliver_one(tp, failed):
                    stats.abandoned += n - i
                    return False
            elif i < n:
                await asyncio.sleep(0)  # let the agent take what was just queued
        return True

    def _raw_event_factory(self, channel: Any) -> Callable[[Any], Any] | None:
        """What ``channel.decode`` makes of a message, made directly; None if not exact.

        For raw bytes keys and values, faust's decode (Schema -> serializer Registry -> the raw
        codec) returns the record's own key and value objects (a contract test checks that it
        still does); half of the bulk path's cost per message is spent getting there. Only
        when faust's own Schema, Registry and App.create_event are in use.
        """
        schema = getattr(channel, "schema", None)
        app = self.app
        if (
            type(schema) is not faust.Schema
            or schema.key_type is not bytes
            or schema.value_type is not bytes
            or schema.key_serializer != "raw"
            or schema.value_serializer != "raw"
            or type(app.serializers) is not Registry
            or type(app).create_event is not faust.App.create_event
        ):
            return None
        event = cast(Any, app.conf).Event

        def raw_event(message: Any) -> Any:
            return event(app, message.key, message.value, message.headers, message)

        return raw_event

    async def _wait_for_room(self, queue: Any) -> None:
        """Until the queue has room, the flow may have changed, or ``poll_s`` passed.

        A full queue: wait on a future in its putters (``asyncio.Queue`` wakes the first on
        every get; faust's ``ThrowableQueue.clear`` on revocation cancels them all) without
        putting anything: the caller checks the flow again before it puts.
        """
        self.bulk_stats.waits += 1
        if not queue.full():
            await asyncio.sleep(self.poll_s)  # flow control suspended: faust's startup only
            return
        putters = queue._putters
        waiter = asyncio.get_running_loop().create_future()
        putters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=self.poll_s)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    putters.remove(waiter)
            elif waiter.cancelled():
                self.bulk_stats.waits_cleared += 1
            elif not queue.full():
                # woken for room we may leave unused (flow stopped): pass the wake-up on, as
                # asyncio.Queue.put does when a woken putter is cancelled
                queue._wakeup_next(putters)

    def _pressure_callbacks(self, tp: TP) -> tuple[Callable[[], None], Callable[[], None]]:
        # the conductor's, per partition (transport/conductor.py, ConductorCompiler.build):
        # high pressure stops fetching the partition, the drop resumes it
        callbacks = self._pressure.get(tp)
        if callbacks is None:
            # faust's own TP type: fetched records name aiokafka's TopicPartition, which
            # compares equal but fails the consumer's isinstance checks on active partitions
            tp = TP(tp.topic, tp.partition)
            on_topic_buffer_full = self.app.sensors.on_topic_buffer_full

            def on_pressure_high() -> None:
                on_topic_buffer_full(tp)
                self.on_buffer_full(tp)

            def on_pressure_drop() -> None:
                self.on_buffer_drop(tp)

            callbacks = self._pressure[tp] = (on_pressure_high, on_pressure_drop)
        return callbacks

    async def _deliver_stock(
        self, tp: TP, records: Sequence[Any], active: set[TP] | None, generation: int
    ) -> bool:
        """faust's own path for ``records``, one at a time; False if the flow stopped."""
        for index, record in enumerate(records):
            state = self._flow(tp, active, generation)
            if state == _ABANDON:
                return False
            if state == _SKIP:
                continue
            if not await self._deliver_one(tp, self._to_message(tp, record)):
                return False
            if not index % 100:
                await asyncio.sleep(0)  # faust yields every 100 messages
        return True

    async def _deliver_one(self, tp: TP, message: Any) -> bool:
        """faust's per-message step (Consumer._drain_messages); False if the flow stopped."""
        offset = message.offset
        r_offset = self._read_offset[tp]
        if r_offset is None or offset >= r_offset:
            gap = offset - (r_offset or 0)
            if gap > 1 and r_offset and self.app.topics.acks_enabled_for(message.topic):
                await self._add_gap(tp, r_offset + 1, offset)
            commit_every = self._commit_every
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await self.wait_first(self.callback(message), self.suspend_flow.wait())
            self._read_offset[tp] = offset
            self.bulk_stats.stock += 1
        return self.flow_active


class BulkTransport(AIOKafkaTransport):
    """faust's aiokafka transport, creating a `BulkConsumer` for ``bulk_topics``."""

    Consumer = BulkConsumer

    def __init__(self, *args: Any, bulk_topics: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bulk_topics = frozenset(bulk_topics)


def use_bulk_consumer(app: faust.App, topics: Iterable[str]) -> None:
    """Let ``app`` consume ``topics`` through `BulkConsumer`; call it before the app starts.

    ``topics`` should be consumed by one agent, with faust acks off (``acks=False``): other
    cases fall back to faust's own per-message path, record by record.
    """
    if cast(Any, app)._consumer is not None:
        raise StreamError(
            "use_bulk_consumer: the app already created its consumer; call it in build_app, "
            "before the app starts"
        )
    current = app.transport
    if type(current) not in (AIOKafkaTransport, BulkTransport):
        raise StreamError(
            f"use_bulk_consumer needs faust's aiokafka transport (kafka://), not "
            f"{type(current).__name__}"
        )
    wanted = frozenset(topics) | getattr(current, "bulk_topics", frozenset())
    app.transport = BulkTransport(app.conf.broker_consumer, app, bulk_topics=wanted)


def bulk_stats(app: faust.App) -> BulkStats | None:
    """The bulk path's counters, or None if the app's consumer is not a `BulkConsumer` (yet)."""
    consumer = cast(Any, app)._consumer
    return consumer.bulk_stats if isinstance(consumer, BulkConsumer) else None


def highwaters(app: faust.App, topic: str) -> dict[int, int]:
    """The high watermark of every assigned partition of ``topic``, as the consumer's last
    fetch reported it (partitions not fetched from yet are left out)."""
    consumer = cast(Any, app)._consumer
    if consumer is None:
        return {}
    out: dict[int, int] = {}
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        try:
            hw = consumer.highwater(tp)
        except Exception:  # noqa: BLE001, S112 - not assigned any more (a rebalance in between)
            continue
        if hw is not None:
            out[tp.partition] = int(hw)
    return out


def use_faust_metrics(app: faust.App, registry: CollectorRegistry, prefix: str = "faust") -> None:
    """Let faust's own Prometheus sensor report into ``registry`` (metric names ``faust_*``,
    never ``stream_rnn_*``); call it before the app starts. faust's web page for them is not
    used: the worker's metrics server exposes the registry."""
    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor  # noqa: PLC0415

    app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(registry, prefix))
