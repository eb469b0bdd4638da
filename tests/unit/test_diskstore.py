"""On-disk store for evicted states: bounded memory, exact restore, pending writes tracked."""

from __future__ import annotations

from pathlib import Path

import torch

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.store import StoredState, decode_position, encode_state
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
