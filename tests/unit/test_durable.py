"""DurableState without a broker: failed checkpoints are retried, restores never go backwards."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import TOKEN, Event
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.store import StoredState, encode_state
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.stream.adapter import CountingSensor
from stream_rnn.stream.durable import DurableState
from stream_rnn.stream.state import EncodedState, StateWriter
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.from_tokens([f"t{i}" for i in range(8)], "token")


class FlakyWriter:
    """Stands in for `StateWriter`: fails the first ``failures`` writes, records the rest."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: dict[str, StoredState] = {}
        self.bytes = 0

    async def write(
        self,
        partition: int,
        states: Sequence[tuple[str, StoredState]],
        deleted: Sequence[tuple[str, int]] = (),
    ) -> int:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        self.written.update(states)
        return len(states)


def _durable(tmp_path: Path, writer: FlakyWriter) -> tuple[DurableState, Engine]:
    torch.manual_seed(0)
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=len(VOCAB), hidden_size=6)
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=VOCAB.to_dict(), weights_sha256="0" * 64, version="m"
    )
    store = DiskStateStore(tmp_path / "states.db")
    engine = Engine(RecurrentModel(cfg).eval(), manifest, pool=StatePool(cfg, 8, store=store))
    durable = DurableState(
        engine,
        store,
        cast(StateWriter, writer),
        "unused:9092",
        "unused-state",
        ThreadPoolExecutor(max_workers=1),
        CountingSensor(),
    )
    return durable, engine


def _tokens(keys: list[str], offset: int) -> list[Event]:
    """One token per key, at consecutive offsets of partition 0."""
    return [
        Event(k, TOKEN, token=5, id=f"0:{offset + i}", offset=offset + i, partition=0)
        for i, k in enumerate(keys)
    ]


def test_a_failed_checkpoint_is_written_by_the_next_one(tmp_path: Path) -> None:
    writer = FlakyWriter(failures=1)
    durable, engine = _durable(tmp_path, writer)
    engine.process(_tokens(["a", "b"], 0))

    async def scenario() -> Any:
        with pytest.raises(ConnectionError):
            await durable.checkpoint()
        # the states are no longer dirty in the pool, yet the next checkpoint writes them
        assert engine.pool.take_dirty() == []
        engine.process(_tokens(["b"], 2))
        return await durable.checkpoint()

    assert asyncio.run(scenario()) == 2
    assert {k: s.offset for k, s in writer.written.items()} == {"a": 0, "b": 2}


def test_restore_keeps_the_higher_applied_offset(tmp_path: Path) -> None:
    durable, engine = _durable(tmp_path, FlakyWriter(failures=0))
    engine.process(_tokens(["fresh", "stale"], 10))  # resident: offsets 10 and 11

    def record(offset: int) -> EncodedState:
        state = StoredState(torch.full((1, 6), 0.5), None, seq=0, pos=3, offset=offset, partition=0)
        return EncodedState(offset, 0, encode_state(state))

    # "fresh" is resident at a newer offset than its record; "stale" at an older one
    loaded = durable._load({"fresh": record(4), "stale": record(20), "cold": record(7)})
    assert loaded == 2 and "stale" not in engine.pool and "fresh" in engine.pool
    slots = engine.pool.lookup(["stale", "cold"])
    assert engine.pool.applied[slots].tolist() == [20, 7]
    assert torch.equal(engine.pool.gather(slots)[0, 0], torch.full((6,), 0.5))
