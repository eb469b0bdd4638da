"""State pool: LRU eviction, TTL expiry, exact restore, storage precision."""

from __future__ import annotations

import time

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


def _at(pool: StatePool, key: str, partition: int, offset: int) -> None:
    """Record a source position for a resident key, as the engine does."""
    slot = pool.slot_of[key]
    pool.part[slot], pool.applied[slot] = partition, offset


def test_delete_forgets_a_resident_key_and_records_a_tombstone() -> None:
    pool = StatePool(_cfg(), capacity=2)
    _fill(pool, "a", 1.0)
    _at(pool, "a", 3, 17)
    assert pool.delete("a") is True
    assert "a" not in pool and not pool.known("a") and len(pool.store) == 0
    assert dict(pool.deleted) == {"a": (3, 17)} and pool.deletions == 1
    assert pool.delete("a") is False and pool.delete("never") is False
    assert pool.take_deleted(partition=0) == []
    assert pool.take_deleted(partition=3) == [("a", 3, 17)] and not pool.deleted
    # its slot is free again: two more keys fit without an eviction
    _fill(pool, "b", 2.0)
    _fill(pool, "c", 3.0)
    assert pool.evictions == 0


def test_delete_of_a_stored_key_reports_the_stored_partition() -> None:
    pool = StatePool(_cfg("gru"), capacity=1)
    _fill(pool, "a", 1.0)
    _at(pool, "a", 2, 5)
    _fill(pool, "b", 2.0)  # a goes to the store
    assert "a" not in pool and "a" in pool.store
    assert pool.delete("a") is True and "a" not in pool.store and pool.restores == 0
    _fill(pool, "n", 3.0)  # never saw an offset: reported with partition -1
    assert pool.delete("n") is True
    assert sorted(pool.take_deleted()) == [("a", 2, 5), ("n", -1, -1)]


def test_a_deleted_key_admitted_again_cancels_its_tombstone() -> None:
    pool = StatePool(_cfg("gru"), capacity=2)
    _fill(pool, "k", 4.0)
    _at(pool, "k", 1, 9)
    pool.delete("k")
    slots = pool.lookup(["k"])
    assert pool.take_deleted() == []
    assert torch.equal(pool.gather(slots), torch.zeros(2, 1, 4))
    assert (int(pool.seq[slots]), int(pool.pos[slots])) == (0, 0)
    # the new (zero) state replaces the old record: written at the next checkpoint, with the
    # partition and offset of the deletion, so that it wins over the old one
    ((key, state),) = pool.take_dirty(partition=1)
    assert key == "k" and (state.offset, state.partition, state.pos) == (9, 1, 0)


def test_drop_partition_drops_its_pending_deletions() -> None:
    pool = StatePool(_cfg("gru"), capacity=4)
    for key, part in (("a", 0), ("b", 1), ("c", 1)):
        _fill(pool, key, 1.0)
        _at(pool, key, part, 0)
    pool.delete("a")
    pool.delete("b")
    assert pool.drop_partition(1) == 1 and "c" not in pool
    assert pool.take_deleted() == [("a", 0, 0)]


def test_retire_deletes_resident_keys_idle_past_the_retention() -> None:
    clock = Clock()
    pool = StatePool(_cfg("gru"), capacity=4, ttl_s=5.0, retention_s=10.0, clock=clock)
    _fill(pool, "old", 1.0)
    clock.now = 8.0
    _fill(pool, "new", 2.0)
    assert pool.retire() == 0  # old: idle 8 s < 10 s
    clock.now = 10.0
    assert pool.retire() == 1 and pool.retirements == 1
    assert not pool.known("old") and "new" in pool
    assert pool.take_deleted() == [("old", -1, -1)]
    assert pool.retire(now=18.0) == 1 and len(pool) == 0  # an explicit reading of the clock


def test_retire_deletes_stored_keys_by_their_wall_clock_last_use() -> None:
    clock = Clock()
    pool = StatePool(_cfg("gru"), capacity=4, ttl_s=5.0, retention_s=100.0, clock=clock)
    _fill(pool, "a", 1.0)
    _at(pool, "a", 0, 4)
    clock.now = 30.0
    _fill(pool, "b", 2.0)
    clock.now = 36.0
    assert pool.expire() == 2 and len(pool.store) == 2  # eviction is not deletion
    wall = time.time()
    # last used 36 s (a) and 6 s (b) ago by the pool's clock: the store keeps those times
    assert pool.retire(now_wall=wall + 63.0) == 0
    assert pool.retire(now_wall=wall + 66.0) == 1
    assert pool.take_deleted() == [("a", 0, 4)] and "a" not in pool.store and "b" in pool.store
    assert pool.retire(now_wall=wall + 95.0) == 1 and len(pool.store) == 0


def test_retention_arguments_are_checked() -> None:
    with pytest.raises(PoolError, match=r"retention must be > 0 seconds .* got 0"):
        StatePool(_cfg(), capacity=1, retention_s=0)
    with pytest.raises(PoolError, match="retention 60 s is shorter than the memory TTL 3600 s"):
        StatePool(_cfg(), capacity=1, ttl_s=3600, retention_s=60)
    assert StatePool(_cfg(), capacity=1, ttl_s=60, retention_s=60).retention_s == 60
    assert StatePool(_cfg(), capacity=1).retire() == 0  # no retention: never deletes


def test_dirty_states_are_copied_at_once_and_made_per_key_when_read() -> None:
    from stream_rnn.engine.dirty import READ_SLICE, DirtyStates

    cfg = ModelConfig(task="next-token", cell="lstm", vocab_size=10, hidden_size=3, num_layers=2)
    pool = StatePool(cfg, capacity=READ_SLICE + 88)
    keys = [f"k{i}" for i in range(READ_SLICE + 88)]
    slots = pool.lookup(keys)
    h, c = torch.randn(2, len(keys), 3), torch.randn(2, len(keys), 3)
    pool.scatter(slots, (h, c))
    pool.part[slots] = 7
    dirty = pool.take_dirty(partition=7)
    assert isinstance(dirty, DirtyStates) and len(dirty) == len(keys)
    assert pool.take_dirty(partition=7) == []  # marked clean when taken
    pool.scatter(slots, (torch.zeros_like(h), torch.zeros_like(c)))  # later writes: not seen
    made = list(dirty)  # in slices of READ_SLICE
    assert [k for k, _ in made] == keys and dict(dirty).keys() == set(keys)
    for i, (key, state) in enumerate(made):
        assert torch.equal(state.h, h[:, i]) and torch.equal(state.c, c[:, i]), key
        assert state.partition == 7 and state.version is None
    assert dirty[-1][0] == keys[-1] and [k for k, _ in dirty[3:9:2]] == ["k3", "k5", "k7"]
    assert [k for k, _ in dirty[READ_SLICE - 2 : READ_SLICE + 2]] == keys[READ_SLICE - 2 :][:4]
    assert dirty[5:5] == []
    with pytest.raises(IndexError):
        dirty[len(keys)]
