"""On-disk store for evicted states: bounded memory, exact restore, pending writes tracked."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import torch

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.store import MemoryStateStore, StoredState, decode_position, encode_state
from stream_rnn.model import ModelConfig


def test_put_pop_pending_and_partition_drop(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    a = StoredState(h=torch.randn(2, 3), c=torch.randn(2, 3), seq=1, pos=2, offset=7, partition=0)
    b = StoredState(h=torch.randn(2, 3), c=None, seq=0, pos=1, offset=3, partition=1)
    store.put("a", a)
    store.put("b", b)
    store.put("a", a)  # replace, not a second row
    assert len(store) == 2 and "a" in store and "zzz" not in store
    assert [k for k, _ in store.take_pending(partition=1)] == ["b"]
    assert [k for k, _ in store.take_pending()] == ["a"]
    back = store.pop("a")
    assert back is not None and torch.equal(back.h, a.h) and torch.equal(back.c, a.c)
    assert back.offset == 7 and "a" not in store and len(store) == 1
    assert store.drop_partition(1) == 1 and len(store) == 0
    store.put_restored("c", b)
    assert store.take_pending() == [] and len(DiskStateStore(tmp_path / "s.db")) == 1


def test_pool_evicts_to_disk_and_restores_exactly(tmp_path: Path) -> None:
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=10, hidden_size=5, num_layers=2)
    pool = StatePool(cfg, capacity=4, store=DiskStateStore(tmp_path / "p.db"))
    values = {}
    for i in range(40):
        key = f"k{i}"
        slots = pool.lookup([key])
        values[key] = torch.randn(2, 1, 5)
        pool.scatter(slots, values[key])
    assert len(pool) == 4 and len(pool.store) == 36
    for key, value in values.items():
        assert torch.equal(pool.gather(pool.lookup([key])), value)


def test_bulk_restore_loads_encoded_states_not_pending(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    old = StoredState(h=torch.randn(1, 4), c=None, seq=0, pos=1, offset=2, partition=3)
    store.put("a", old)  # pending, and replaced by the restore below
    states = {
        f"k{i}": StoredState(h=torch.randn(1, 4), c=None, seq=0, pos=i, offset=i, partition=3)
        for i in range(50)
    }
    states["a"] = StoredState(h=torch.randn(1, 4), c=None, seq=0, pos=9, offset=9, partition=3)
    store.put_restored_encoded([(k, s.partition, encode_state(s)) for k, s in states.items()])
    assert len(store) == 51 and store.take_pending() == []
    back = store.pop("a")
    assert back is not None and back.offset == 9 and torch.equal(back.h, states["a"].h)
    assert len(store) == 50 and decode_position(encode_state(old)) == (2, 3)


def _state(offset: int, partition: int) -> StoredState:
    return StoredState(
        h=torch.randn(1, 4), c=None, seq=0, pos=1, offset=offset, partition=partition
    )


def test_delete_removes_the_row_and_its_pending_write(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    store.put("a", _state(3, 0))
    store.put("b", _state(4, 0))
    assert store.delete("a") is True and "a" not in store and len(store) == 1
    assert [k for k, _ in store.take_pending()] == ["b"]
    assert store.delete("a") is False
    # a resident key's pending copy (its row was popped) goes too, though no row is deleted
    store.put("c", _state(5, 1))
    assert store.pop("c") is not None and "c" in store.pending
    assert store.delete("c") is False and "c" not in store.pending


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_delete_idle_deletes_keys_last_used_before_a_time(tmp_path: Path, kind: str) -> None:
    store = MemoryStateStore() if kind == "memory" else DiskStateStore(tmp_path / "s.db")
    store.put("old", _state(7, 2), last_used=100.0)
    store.put("edge", _state(8, 1), last_used=150.0)
    store.put("now", _state(9, 1))  # time.time()
    assert store.delete_idle(99.0) == []
    assert sorted(store.delete_idle(150.0)) == [("edge", 1, 8), ("old", 2, 7)]
    assert len(store) == 1 and "now" in store and "old" not in store
    if isinstance(store, DiskStateStore):
        assert [k for k, _ in store.take_pending()] == ["now"]
    assert store.delete_idle(time.time() - 60) == []
    assert store.delete("now") is True and len(store) == 0


def test_bulk_restore_takes_last_use_times(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    rows = [
        ("three", 0, encode_state(_state(1, 0))),  # no time: now
        ("four", 0, encode_state(_state(2, 0)), 500.0),
        ("none", 0, encode_state(_state(3, 0)), None),  # now
        ("minus", 0, encode_state(_state(4, 0)), -0.001),  # Kafka's "no timestamp": now
    ]
    store.put_restored_encoded(rows)
    assert len(store) == 4 and store.take_pending() == []
    assert store.delete_idle(1000.0) == [("four", 0, 2)]
    assert store.delete_idle(time.time() - 60) == [] and len(store) == 3


def test_a_file_without_last_use_times_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE states (key TEXT PRIMARY KEY, part INTEGER, value BLOB)")
    db.execute("INSERT INTO states VALUES (?, ?, ?)", ("k", 1, encode_state(_state(6, 1))))
    db.commit()
    db.close()
    before = time.time()
    store = DiskStateStore(path)
    assert len(store) == 1 and store.delete_idle(before - 1) == []
    store.close()
    store = DiskStateStore(path)  # opening again changes nothing
    assert store.delete_idle(time.time()) == [("k", 1, 6)]
    store.close()


def test_pool_retires_keys_stored_on_disk(tmp_path: Path) -> None:
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=10, hidden_size=5, num_layers=1)
    store = DiskStateStore(tmp_path / "p.db")
    pool = StatePool(cfg, capacity=1, retention_s=3600.0, store=store)
    pool.lookup(["a"])
    pool.lookup(["b"])  # a is evicted to disk
    store.put_restored("r", _state(11, 4), last_used=time.time() - 7200)  # restored, idle 2 h
    assert pool.retire() == 1 and pool.take_deleted() == [("r", 4, 11)]
    assert pool.known("a") and pool.known("b")
    assert pool.retire(now_wall=time.time() + 3600) == 1  # a, on disk; b is resident
    assert pool.take_deleted() == [("a", -1, -1)] and len(store) == 0 and "b" in pool


def test_pending_states_wait_in_the_file_not_in_memory(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    states = {
        f"k{i}": StoredState(
            h=torch.randn(2, 4), c=torch.randn(2, 4), seq=i, pos=i + 1, offset=i, partition=i % 2
        )
        for i in range(1_200)  # more than one SELECT's worth of keys
    }
    for key, state in states.items():
        store.put(key, state)
    # what waits for the checkpoint is the key's partition only; the tensors are in the file
    assert store.pending == {k: s.partition for k, s in states.items()}
    store.pop("k3")  # pending, then back in the pool (admitted clean): still written
    store.put("k5", states["k7"])  # a newer state replaces the pending one
    store.delete("k9")  # deleted: the caller writes a tombstone instead
    taken = dict(store.take_pending(partition=1))
    assert sorted(taken) == sorted(k for k in states if states[k].partition == 1 and k != "k9")
    for key, state in taken.items():
        want = states["k7"] if key == "k5" else states[key]
        assert torch.equal(state.h, want.h) and torch.equal(state.c, want.c)
        assert (state.seq, state.pos, state.offset) == (want.seq, want.pos, want.offset)
    rest = dict(store.take_pending())
    assert sorted(rest) == sorted(k for k in states if states[k].partition == 0)
    assert torch.equal(rest["k0"].h, states["k0"].h) and store.take_pending() == []
