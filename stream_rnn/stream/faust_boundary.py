"""Every use of a faust-streaming internal, in one place (an anti-corruption layer).

The worker needs four things faust does not offer as public API; each is wrapped here, and
``tests/unit/test_faust_contract.py`` fails loudly if an upgrade changes one of them:

* ``channel_queue(stream)``: the agent channel's queue, to take micro-batches in bulk
  (`stream_rnn.stream.batches`) instead of faust's per-message iterator;
* ``commit_offsets(app, topic, offsets)``: faust's consumer commit path without its ack
  bookkeeping (at-least-once: offsets are committed after the checkpoint, acks are off);
* ``generation_id(app)`` and ``event_generation(event)``: the consumer group generation now and
  the one an event was fetched in (events of an earlier generation are stale copies);
* ``event_position(event)``: partition and offset of the event's message.

faust-streaming and aiokafka are pinned to the tested minor versions in ``pyproject.toml``;
`check_versions` says which ones were tested.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, cast

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP, EventT, StreamT

from stream_rnn.stream.batches import EventQueue

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
