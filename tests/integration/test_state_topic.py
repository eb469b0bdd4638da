"""Durable states on a real compacted topic: write, restore, highest applied offset wins."""

from __future__ import annotations

import asyncio

import torch

from stream_rnn.engine.store import StoredState
from stream_rnn.stream.state import StateWriter, restore_partition


def _state(value: float, offset: int) -> StoredState:
    return StoredState(
        h=torch.full((2, 8), value),
        c=torch.full((2, 8), -value),
        seq=1,
        pos=offset + 1,
        offset=offset,
        partition=1,
    )


def test_write_and_restore_partition(kafka_broker: str, topic_factory) -> None:
    topic = topic_factory("state", partitions=2, config={"cleanup.policy": "compact"})

    async def scenario() -> dict[str, StoredState]:
        writer = StateWriter(kafka_broker, topic)
        await writer.start()
        try:
            await writer.write(1, [("a", _state(1.0, 10)), ("b", _state(2.0, 11))])
            await writer.write(1, [("a", _state(3.0, 20))])
            # a stale owner's late write must not move "b" backwards
            await writer.write(1, [("b", _state(0.5, 5))])
            await writer.write(0, [("other", _state(9.0, 1))])
        finally:
            await writer.stop()
        return await restore_partition(kafka_broker, topic, 1, timeout_s=30)

    restored = asyncio.run(scenario())
    assert set(restored) == {"a", "b"}
    assert restored["a"].offset == 20 and torch.equal(restored["a"].h, torch.full((2, 8), 3.0))
    assert restored["b"].offset == 11 and torch.equal(restored["b"].c, torch.full((2, 8), -2.0))
    empty = asyncio.run(restore_partition(kafka_broker, topic, 1, timeout_s=30))
    assert set(empty) == {"a", "b"}
