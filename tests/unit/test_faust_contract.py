"""Contract tests of every faust-streaming internal the worker uses (stream/faust_boundary.py).

An upgrade of faust-streaming (or aiokafka) that changes one of these fails here, loudly and by
name, instead of in a chaos test or in production.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import faust
from faust.transport.consumer import Consumer
from faust.types import TP

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
