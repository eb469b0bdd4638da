"""State pool: LRU eviction, TTL expiry, exact restore, storage precision."""

from __future__ import annotations

import pytest
import torch

from stream_rnn.engine.exceptions import PoolError
from stream_rnn.engine.pool import StatePool
from stream_rnn.model import ModelConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cfg(cell: str = "lstm") -> ModelConfig:
    return ModelConfig(task="next-token", cell=cell, vocab_size=10, hidden_size=4, num_layers=2)


def _fill(pool: StatePool, key: str, value: float) -> None:
    slots = pool.lookup([key])
    h = torch.full((2, 1, 4), value)
    pool.scatter(slots, (h, -h) if pool.c is not None else h)
    pool.pos[slots] += 3


def test_lru_eviction_and_exact_restore() -> None:
    pool = StatePool(_cfg(), capacity=2)
    _fill(pool, "a", 0.1234567)
    _fill(pool, "b", 2.0)
    pool.lookup(["a"])  # a is now most recently used
    _fill(pool, "c", 3.0)  # evicts b, the least recently used
    assert "b" not in pool and pool.known("b") and len(pool) == 2
    assert pool.evictions == 1
    slots = pool.lookup(["b"])  # evicts a, restores b bit for bit
    h, c = pool.gather(slots)
    assert torch.equal(h, torch.full((2, 1, 4), 2.0)) and torch.equal(c, -h)
    assert int(pool.pos[slots]) == 3 and pool.restores == 1
    h, _ = pool.gather(pool.lookup(["a"]))
    assert torch.equal(h, torch.full((2, 1, 4), 0.1234567))


def test_ttl_expiry_moves_idle_keys_to_the_store() -> None:
    clock = Clock()
    pool = StatePool(_cfg("gru"), capacity=10, ttl_s=5.0, clock=clock)
    _fill(pool, "old", 1.0)
    clock.now = 4.0
    _fill(pool, "new", 2.0)
    clock.now = 6.0
    assert pool.expire() == 1
    assert "old" not in pool and "new" in pool and pool.known("old")
    assert torch.equal(pool.gather(pool.lookup(["old"])), torch.full((2, 1, 4), 1.0))


def test_new_keys_start_from_zero_and_clear_starts_a_new_sequence() -> None:
    pool = StatePool(_cfg("gru"), capacity=3)
    _fill(pool, "k", 5.0)
    slots = pool.lookup(["k"])
    pool.clear(slots)
    assert torch.equal(pool.gather(slots), torch.zeros(2, 1, 4))
    assert int(pool.pos[slots]) == 0 and int(pool.seq[slots]) == 1
    assert torch.equal(pool.gather(pool.lookup(["fresh"])), torch.zeros(2, 1, 4))


def test_half_precision_storage_rounds_but_bounds_the_error() -> None:
    pool = StatePool(_cfg("gru"), capacity=2, storage="float16")
    value = torch.rand(2, 1, 4)
    slots = pool.lookup(["k"])
    pool.scatter(slots, value)
    back = pool.gather(slots)
    assert back.dtype == torch.float32
    assert (back - value).abs().max() <= 1e-3
    assert pool.nbytes == 2 * 2 * 4 * 2  # L * capacity * H * 2 bytes


def test_bad_pool_arguments() -> None:
    with pytest.raises(PoolError, match="capacity must be >= 1"):
        StatePool(_cfg(), capacity=0)
    with pytest.raises(PoolError, match="storage 'int8' is unknown"):
        StatePool(_cfg(), capacity=1, storage="int8")
    pool = StatePool(_cfg(), capacity=2)
    with pytest.raises(PoolError, match="exceed the pool capacity 2"):
        pool.lookup(["a", "b", "c"])
