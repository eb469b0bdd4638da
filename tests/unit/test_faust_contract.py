"""Contract tests of every faust-streaming internal the worker uses (stream/faust_boundary.py).

An upgrade of faust-streaming (or aiokafka) that changes one of these fails here, loudly and by
name, instead of in a chaos test or in production.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import textwrap
from importlib.metadata import version
from pathlib import Path

import faust
import pytest
from faust.transport.conductor import Conductor, ConductorCompiler
from faust.transport.consumer import Consumer, Fetcher
from faust.transport.drivers.aiokafka import Consumer as DriverConsumer
from faust.transport.drivers.aiokafka import Transport as DriverTransport
from faust.types import TP
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream_rnn.stream import faust_boundary as fb


def test_the_installed_versions_are_the_tested_ones() -> None:
    assert fb.check_versions() == [], "pyproject.toml pins faust-streaming and aiokafka"
    assert version("faust-streaming").startswith("0.15.")


def test_consumer_commit_offsets_takes_a_tp_mapping_and_returns_a_bool() -> None:
    method = Consumer._commit_offsets
    assert inspect.iscoroutinefunction(method)
    params = list(inspect.signature(method).parameters)
    assert params[:2] == ["self", "offsets"]


def test_commit_offsets_leaves_out_partitions_not_assigned() -> None:
    """faust's ``_commit_offsets`` returns False (commits nothing) for revoked partitions."""

    class FakeConsumer:
        def assignment(self) -> set[TP]:
            return set()

        log = faust.App("contract-log").log

    consumer = FakeConsumer()
    done = asyncio.run(Consumer._commit_offsets(consumer, {TP("t", 0): 5}))  # type: ignore[arg-type]
    assert done is False


def test_app_has_a_consumer_generation_id() -> None:
    app = faust.App("contract-app", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert "consumer_generation_id" in dir(app)
    assert fb.generation_id(app) in (None, 0)


def test_agent_stream_has_a_channel_queue_with_get_and_get_nowait() -> None:
    app = faust.App("contract-stream", broker="memory://", autodiscover=False)
    channel = app.channel()
    stream = channel.stream()
    queue = fb.channel_queue(stream)
    assert inspect.iscoroutinefunction(queue.get)
    assert callable(queue.get_nowait)


def test_event_messages_carry_partition_offset_and_generation() -> None:
    from faust.types.tuples import Message

    fields = inspect.signature(Message.__init__).parameters
    for name in ("partition", "offset", "generation_id", "key", "value", "timestamp"):
        assert name in fields, name

    class Ev:
        message = Message("t", 3, 42, 0.0, 0, None, b"k", b"v", None, generation_id=7)  # type: ignore[arg-type]

    assert fb.event_position(Ev()) == (3, 42)  # type: ignore[arg-type]
    assert fb.event_generation(Ev()) == 7  # type: ignore[arg-type]


def test_signals_used_by_the_worker_exist() -> None:
    app = faust.App("contract-signals", broker="kafka://127.0.0.1:1", autodiscover=False)
    for name in ("on_partitions_assigned", "on_partitions_revoked", "on_before_shutdown"):
        assert callable(getattr(app, name).connect), name


# --------------------------------------------------------------------------- the bulk consume path
# BulkConsumer (faust_boundary.py) replaces faust's drain loop and does the conductor's delivery
# in bulk. The faust code it mirrors is fingerprinted (its AST without docstrings or comments):
# when an upgrade changes one, re-read it against BulkConsumer, adapt, then update the print.
MIRRORED = {
    "Consumer._drain_messages": (Consumer, "_drain_messages", "534d036692b697d3"),
    "Consumer.getmany": (Consumer, "getmany", "1936842581381d27"),
    "Consumer._wait_next_records": (Consumer, "_wait_next_records", "76ecab68a00e6ffb"),
    "ConductorCompiler.build": (ConductorCompiler, "build", "15d11ee554376d31"),
    "Conductor.on_partitions_assigned": (Conductor, "on_partitions_assigned", "a768ca4abfa88562"),
    "aiokafka Consumer._to_message": (DriverConsumer, "_to_message", "a1b4080f1f220e0f"),
}
CYTHON_CONDUCTOR = "5d021200f38871d4"  # faust/transport/_cython/conductor.pyx, code lines


def _fingerprint(obj: object) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))  # type: ignore[arg-type]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_the_faust_code_the_bulk_path_mirrors_is_unchanged(name: str) -> None:
    owner, attr, expected = MIRRORED[name]
    assert _fingerprint(getattr(owner, attr)) == expected, (
        f"faust's {name} changed: BulkConsumer (stream/faust_boundary.py) mirrors it; re-read "
        "both, adapt BulkConsumer, then update the fingerprint here"
    )


def test_the_cython_conductor_the_bulk_path_mirrors_is_unchanged() -> None:
    import faust.transport._cython as cython_pkg
    from faust.transport import conductor

    assert conductor.ConductorHandler is not None, "faust runs its Python conductor: re-check"
    pyx = (Path(cython_pkg.__file__).parent / "conductor.pyx").read_text()
    lines = [line.split("#")[0].rstrip() for line in pyx.splitlines()]
    code = "\n".join(line for line in lines if line.strip())
    assert hashlib.sha256(code.encode()).hexdigest()[:16] == CYTHON_CONDUCTOR, (
        "faust's ConductorHandler (the per-message delivery BulkConsumer does in bulk) changed"
    )


def test_the_fetcher_runs_the_consumers_drain_loop() -> None:
    # the extension point: faust's Fetcher service calls consumer._drain_messages(fetcher)
    assert "consumer._drain_messages(self)" in inspect.getsource(Fetcher._fetcher.fun)
    assert fb.BulkConsumer._drain_messages is not Consumer._drain_messages
    assert issubclass(fb.BulkConsumer, DriverConsumer)
    assert issubclass(fb.BulkTransport, DriverTransport)


def test_an_app_creates_its_consumer_from_its_transport_lazily() -> None:
    app = faust.App("contract-transport", broker="kafka://127.0.0.1:1", autodiscover=False)
    app.topic("t", acks=False)
    app.agent(app.topic("t"))(_noop_agent)
    assert app._consumer is None, "use_bulk_consumer must run before faust creates its consumer"
    fb.use_bulk_consumer(app, ["t"])
    assert isinstance(app.transport, fb.BulkTransport)
    assert isinstance(app.consumer, fb.BulkConsumer)
    assert app.consumer.callback == app.topics.on_message


async def _noop_agent(stream: object) -> None:
    return None


def _statements_between(func: object, first: str, last: str) -> list[ast.stmt]:
    """The statements of ``func`` from the one that mentions ``first`` to ``last`` (one block)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))  # type: ignore[arg-type]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        text = [ast.unparse(s) if isinstance(s, ast.stmt) else "" for s in body]
        starts = [i for i, t in enumerate(text) if first in t and "\n" not in t]
        ends = [i for i, t in enumerate(text) if last in t and "\n" not in t]
        if starts and ends and starts[0] < ends[0]:
            return body[starts[0] : ends[-1] + 1]
    raise AssertionError(f"{first} ... {last} not found in one block of {func}")


@pytest.mark.parametrize("method", ["_on_partitions_revoked", "_stop_consumer"])
def test_revocation_stops_the_flow_and_clears_the_queues_in_one_step(method: str) -> None:
    # BulkConsumer's rebalance safety: it checks the flow and puts a chunk with no await in
    # between; faust stops the flow and clears the queues with no await in between either.
    block = _statements_between(getattr(faust.App, method), "stop_flow", "flow_control.clear")
    text = [ast.unparse(s) for s in block]
    assert any("flow_control.suspend" in t for t in text), text
    assert not any(isinstance(n, ast.Await) for s in block for n in ast.walk(s)), text


def test_flow_control_clear_empties_the_channel_queue_and_cancels_its_putters() -> None:
    async def main() -> tuple[int, int, bool, bool]:
        app = faust.App(
            "contract-queue", broker="kafka://127.0.0.1:1", autodiscover=False,
            stream_buffer_maxsize=3,
        )  # fmt: skip
        channel = app.topic("t", acks=False).__aiter__()
        queue = channel.queue
        for i in range(3):
            queue.put_nowait(i)
        waiter = asyncio.get_running_loop().create_future()
        queue._putters.append(waiter)  # how BulkConsumer waits for room
        maxsize, full = queue.maxsize, queue.full()
        app.flow_control.clear()
        return maxsize, queue.qsize(), full, waiter.cancelled()

    assert asyncio.run(main()) == (3, 0, True, True)


def test_a_get_wakes_the_first_future_in_the_putters() -> None:
    async def main() -> object:
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        queue.put_nowait(1)
        waiter = asyncio.get_running_loop().create_future()
        queue._putters.append(waiter)  # type: ignore[attr-defined]
        queue.get_nowait()
        assert waiter.done() and not waiter.cancelled()
        assert not queue._putters  # type: ignore[attr-defined]
        queue._wakeup_next(queue._putters)  # type: ignore[attr-defined] # no-op when empty
        return waiter.result()

    assert asyncio.run(main()) is None


def test_put_nowait_enhanced_reports_pressure_high_and_its_drop() -> None:
    calls: list[str] = []
    flow = FlowControlEvent(initially_suspended=False)
    queue: ThrowableQueue[int] = ThrowableQueue(maxsize=10, flow_control=flow)
    for i in range(9):
        queue.put_nowait_enhanced(
            i,
            on_pressure_high=lambda: calls.append("high"),
            on_pressure_drop=lambda: calls.append("drop"),
        )
    assert calls == ["high"]  # at maxsize / 1.25
    while queue.qsize() > 3:
        queue.get_nowait()
    assert calls == ["high", "drop"]  # at maxsize * 0.4


def test_topic_decode_completes_without_suspending() -> None:
    from faust.types.tuples import Message

    async def main() -> tuple[object, object]:
        app = faust.App("contract-decode", broker="kafka://127.0.0.1:1", autodiscover=False)
        raw = app.topic("t", key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw")  # fmt: skip
        as_json = app.topic("j", value_serializer="json")
        message = Message("t", 0, 5, 0.0, 0, None, b"k", b"{bad", None, generation_id=2)  # type: ignore[arg-type]
        good = fb._run_now(raw.decode(message, propagate=True))
        bad = fb._run_now(as_json.decode(message, propagate=True))
        return good, bad

    good, bad = asyncio.run(main())
    assert good is not fb._FAILED
    assert (good.key, good.value, good.message.offset) == (b"k", b"{bad", 5)  # type: ignore[attr-defined]
    assert bad is fb._FAILED


def test_the_conductor_indexes_the_channels_of_each_assigned_partition() -> None:
    async def main() -> tuple[object, object, bool, bool]:
        app = faust.App("contract-index", broker="kafka://127.0.0.1:1", autodiscover=False)
        channel = app.topic("t", acks=False).__aiter__()
        await app.topics.on_partitions_assigned({TP("t", 0), TP("t", 1)})
        index = app.topics._tp_index
        return (
            index.get(TP("t", 1)),
            channel,
            app.topics.acks_enabled_for("t"),
            app.flow_control.is_active(),
        )

    channels, channel, acks, active = asyncio.run(main())
    assert channels == {channel}
    assert acks is False
    assert active is False  # faust's flow control starts suspended


def test_consumer_internals_the_bulk_path_uses() -> None:
    from aiokafka.structs import ConsumerRecord

    app = faust.App("contract-consumer", broker="kafka://127.0.0.1:1", autodiscover=False)
    fb.use_bulk_consumer(app, ["t"])
    consumer = app.consumer
    assert isinstance(consumer, fb.BulkConsumer)
    params = list(inspect.signature(Consumer._wait_next_records).parameters)
    assert params == ["self", "timeout"]
    for name in ("_wait_next_records", "_add_gap", "perform_seek", "commit", "wait_first"):
        assert inspect.iscoroutinefunction(getattr(consumer, name)), name
    for name in ("on_buffer_full", "on_buffer_drop", "_get_active_partitions",
                 "_set_active_tps", "pause_partitions", "highwater", "stop_flow"):  # fmt: skip
        assert callable(getattr(consumer, name)), name
    assert consumer._read_offset[TP("t", 0)] is None  # a defaultdict: None until read
    assert consumer._buffered_partitions == set()
    assert consumer.flow_active is True
    assert isinstance(consumer.suspend_flow, asyncio.Event)
    assert isinstance(consumer._n_acked, int)
    assert consumer._commit_every == app.conf.broker_commit_every
    assert callable(consumer.diag.set_flag) and callable(consumer.diag.unset_flag)
    assert consumer.consumer_stopped_errors
    assert inspect.iscoroutinefunction(app.producer.buffer.wait_until_ebb)
    assert callable(app.monitor.track_tp_end_offset)
    assert callable(app.sensors.on_topic_buffer_full)
    assert app.conf.broker_consumer and app.conf.broker_consumer[0].scheme == "kafka"
    fetcher = Fetcher(app)
    for service in (consumer, fetcher):  # the drain loop stops when either one stops
        assert service._stopped.is_set() is False  # a mode Event
    app.consumer_generation_id = 9
    record = ConsumerRecord("t", 2, 7, 1500, 0, b"k", b"v", None, 1, 1, ())
    message = consumer._to_message(TP("t", 2), record)
    assert (message.partition, message.offset, message.generation_id) == (2, 7, 9)
    assert message.timestamp == 1.5
    message.incref()
    assert message.refcount == 1


def test_the_raw_event_shortcut_equals_fausts_decode() -> None:
    from faust.types.tuples import Message

    async def main() -> list[tuple[object, object]]:
        app = faust.App("contract-raw", broker="kafka://127.0.0.1:1", autodiscover=False)
        raw = app.topic("t", key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw", acks=False).__aiter__()  # fmt: skip
        fb.use_bulk_consumer(app, ["t"])
        consumer = app.consumer
        assert isinstance(consumer, fb.BulkConsumer)
        make = consumer._raw_event_factory(raw)
        assert make is not None
        pairs = []
        for key, value in [(b"k", b"v"), (None, b"v"), (b"k", None), (b"", b"")]:
            message = Message("t", 0, 1, 0.0, 0, [("h", b"1")], key, value, None)  # type: ignore[arg-type]
            faust_event = await raw.decode(message, propagate=True)
            pairs.append((faust_event, make(message)))
        # other schemas keep faust's decode
        as_json = app.topic("j", value_serializer="json").__aiter__()
        as_str = app.topic("s", key_type=bytes, value_type=str, key_serializer="raw",
                           value_serializer="raw").__aiter__()  # fmt: skip
        assert consumer._raw_event_factory(as_json) is None
        assert consumer._raw_event_factory(as_str) is None
        return pairs

    for faust_event, ours in asyncio.run(main()):
        assert type(ours) is type(faust_event)
        assert ours.key is faust_event.key  # type: ignore[attr-defined]
        assert ours.value is faust_event.value  # type: ignore[attr-defined]
        assert ours.headers == faust_event.headers  # type: ignore[attr-defined]
        assert ours.message is faust_event.message  # type: ignore[attr-defined]


def test_highwater_of_the_driver_consumer_and_an_app_without_one() -> None:
    """`highwaters` asks faust's aiokafka driver consumer for ``highwater(tp)``."""
    params = list(inspect.signature(DriverConsumer.highwater).parameters)
    assert params == ["self", "tp"]
    assert not inspect.iscoroutinefunction(DriverConsumer.highwater)
    app = faust.App("contract-hw", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert fb.highwaters(app, "t") == {}  # no consumer yet: nothing, and no consumer created
    assert app._consumer is None


def test_faust_metrics_go_to_our_registry_under_their_own_prefix() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    app = faust.App("contract-metrics", broker="kafka://127.0.0.1:1", autodiscover=False)
    registry = CollectorRegistry()
    fb.use_faust_metrics(app, registry)
    assert type(app.monitor).__name__ == "PrometheusMonitor"
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert names, "faust registered no metrics"
    assert all(n.startswith("faust_") for n in names), names
    assert not any(n.startswith("stream_rnn_") for n in names)
