"""Token histories and model versions travel with states: ring, pool, codec, disk store."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
import torch

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import END, RESET, TOKEN, Event
from stream_rnn.engine.exceptions import StateCodecError
from stream_rnn.engine.history import TokenHistory
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.ragged import group_slots
from stream_rnn.engine.store import (
    StoredState,
    decode_origin,
    decode_position,
    decode_state,
    encode_state,
    encode_states,
)
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.from_tokens([f"t{i}" for i in range(12)], "token")


CFG = ModelConfig(task="next-token", cell="lstm", vocab_size=len(VOCAB), embed_dim=4, hidden_size=5)


def _engine(history: int | None, capacity: int = 3, **kw) -> Engine:
    torch.manual_seed(0)
    manifest = Manifest(
        model_config=CFG.to_dict(), vocab=VOCAB.to_dict(), weights_sha256="0", version="v7"
    )
    return Engine(RecurrentModel(CFG).eval(), manifest, capacity=capacity, history=history, **kw)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_the_ring_keeps_each_keys_last_tokens_in_order(size: int) -> None:
    rng = random.Random(size)
    capacity = 6
    ring = TokenHistory(capacity, size)
    scratch = torch.empty(capacity, dtype=torch.long)
    seen: dict[int, list[int]] = {s: [] for s in range(capacity)}
    for _ in range(60):
        # one micro-batch: some slots with several tokens, more than the ring holds at times
        at = [rng.randrange(capacity) for _ in range(rng.randint(1, 3 * size + 4))]
        tokens = [rng.randrange(4, 1000) for _ in at]
        at_t = torch.tensor(at)
        _, groups = group_slots(at_t, scratch)
        ring.append(at_t, torch.tensor(tokens), groups.rank)
        for slot, token in zip(at, tokens, strict=True):
            seen[slot].append(token)
        if rng.random() < 0.1:
            cleared = rng.randrange(capacity)
            ring.clear(torch.tensor([cleared]))
            seen[cleared] = []
    ids, lengths = ring.rows(torch.arange(capacity))
    for slot in range(capacity):
        want = seen[slot][-size:]
        assert lengths[slot] == len(want) and ids[slot, : len(want)].tolist() == want
        assert not ids[slot, len(want) :].any()


def test_the_engine_keeps_the_current_sequences_last_tokens_and_end_drops_them() -> None:
    engine = _engine(history=4, capacity=2)
    offset = iter(range(1000))

    def tok(key: str, *tokens: int) -> list[Event]:
        return [
            Event(key, TOKEN, token=t, id="x", partition=0, offset=next(offset)) for t in tokens
        ]

    def ctl(key: str, kind: int) -> Event:
        return Event(key, kind, id="x", partition=0, offset=next(offset))

    # one batch holds 6 tokens of "a" (more than its ring) and some of "b"
    engine.process(tok("a", 4, 5, 6) + tok("b", 9) + tok("a", 7, 8, 10) + tok("b", 11))
    assert engine.pool.snapshot("a").history.tolist() == [6, 7, 8, 10]
    assert engine.pool.snapshot("b").history.tolist() == [9, 11]
    engine.process(tok("c", 4))  # "a" goes to the store, its history with it
    assert "a" not in engine.pool
    engine.process(tok("a", 12))
    assert engine.pool.snapshot("a").history.tolist() == [7, 8, 10, 12]
    engine.process([ctl("a", RESET), *tok("a", 13)])  # a new sequence: a new history
    assert engine.pool.snapshot("a").history.tolist() == [13]
    engine.process([ctl("b", END)])  # deleted: its history goes with its state
    engine.process(tok("b", 15))
    assert engine.pool.snapshot("b").history.tolist() == [15]
    # a stored key's deletion drops its stored history too
    engine.process(tok("c", 5) + tok("a", 6))
    engine.process(tok("b", 4))
    assert "c" not in engine.pool and engine.pool.known("c")
    engine.process([ctl("c", END)])
    assert not engine.pool.known("c")
    engine.process(tok("c", 14))
    assert engine.pool.snapshot("c").history.tolist() == [14]
    dirty = dict(engine.pool.take_dirty())
    assert dirty["c"].history.tolist() == [14] and dirty["c"].version == "v7"


def test_no_history_means_none_everywhere() -> None:
    engine = _engine(history=0)
    engine.process([Event("a", TOKEN, token=5, id="x")])
    state = engine.pool.snapshot("a")
    assert state.history is None and state.version == "v7"
    assert decode_state(encode_state(state)).history is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lstm", [False, True])
@pytest.mark.parametrize("n_hist", [None, 0, 5])
def test_version_and_history_round_trip(dtype: torch.dtype, lstm: bool, n_hist: int | None) -> None:
    h = torch.randn(2, 7).to(dtype)
    c = torch.randn(2, 7).to(dtype) if lstm else None
    hist = None if n_hist is None else torch.arange(100, 100 + n_hist, dtype=torch.int32)
    state = StoredState(
        h, c, seq=3, pos=8, offset=99, partition=2, version='v\u00e9 "1"', history=hist
    )
    raw = encode_state(state)
    back = decode_state(raw)
    assert torch.equal(back.h, h) and (c is None or torch.equal(back.c, c))
    assert back.version == 'v\u00e9 "1"' and (back.seq, back.pos, back.offset) == (3, 8, 99)
    assert (back.history is None) == (hist is None)
    if hist is not None:
        assert back.history is not None and back.history.dtype == torch.int32
        assert back.history.tolist() == hist.tolist()
    assert decode_origin(raw) == (99, 2, 'v\u00e9 "1"') and decode_position(raw) == (99, 2)


def test_batch_encoding_with_versions_and_histories_is_byte_identical() -> None:
    h_all, c_all = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    hist_all = torch.arange(6 * 4, dtype=torch.int32).reshape(6, 4)
    states = [
        StoredState(
            h_all[:, i],
            c_all[:, i],
            seq=i,
            pos=i,
            offset=i,
            partition=0,
            version=[None, "v1", "v2"][i % 3],
            history=None if i == 4 else hist_all[i, : i % 5],
        )
        for i in range(6)
    ]
    assert encode_states(states) == [encode_state(s) for s in states]
    assert [decode_state(r).history is None for r in encode_states(states)] == [
        i == 4 for i in range(6)
    ]


def test_records_of_earlier_releases_decode_with_unknown_version() -> None:
    h = torch.randn(1, 3)
    header = {"f": 1, "seq": 1, "pos": 2, "offset": 3, "partition": 0}
    header.update(shape=[1, 3], dtype="float32", lstm=False)
    old = orjson.dumps(header) + b"\n" + h.numpy().tobytes()
    back = decode_state(old)
    assert back.version is None and back.history is None and torch.equal(back.h, h)
    assert decode_origin(old) == (3, 0, None)
    # a record without version nor history is still written as format 1, byte for byte
    assert encode_state(StoredState(h, None, seq=1, pos=2, offset=3, partition=0)) == old


def test_damaged_histories_are_refused() -> None:
    state = StoredState(
        torch.zeros(1, 2), None, 0, 1, 5, 0, "v", torch.tensor([4, 5], dtype=torch.int32)
    )
    good = encode_state(state)
    with pytest.raises(StateCodecError, match="expected"):
        decode_state(good[:-1])
    with pytest.raises(StateCodecError, match="history length"):
        decode_state(good.replace(b'"hist":2', b'"hist":-2'))
    with pytest.raises(StateCodecError, match="version"):
        decode_state(good.replace(b'"v":"v"', b'"v":7'))


def test_the_disk_store_keeps_versions_and_histories(tmp_path: Path) -> None:
    store = DiskStateStore(tmp_path / "s.db")
    hist = torch.tensor([4, 9, 7], dtype=torch.int32)
    state = StoredState(torch.randn(2, 3), None, 1, 4, 8, 0, "v2", hist)
    store.put("a", state)
    store.put_restored_encoded([("b", 0, encode_state(state))])
    for key in ("a", "b"):
        back = store.pop(key)
        assert back is not None and back.version == "v2" and back.history is not None
        assert back.history.tolist() == [4, 9, 7] and torch.equal(back.h, state.h)
    store.close()


def test_histories_survive_eviction_to_disk_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = DiskStateStore(path)
    engine = _engine(None, pool=StatePool(CFG, 1, store=store, history=3))
    events = [Event(k, TOKEN, token=t, id="x") for k, t in [("a", 4), ("b", 5), ("a", 6), ("b", 7)]]
    for ev in events + [Event("a", TOKEN, token=8, id="x")]:
        engine.process([ev])
    assert "b" not in engine.pool
    pending = dict(store.take_pending())
    assert pending["b"].history.tolist() == [5, 7] and pending["b"].version == "v7"
    store.close()
    # a new process on the same file
    again = _engine(None, pool=StatePool(CFG, 1, store=DiskStateStore(path), history=3))
    again.process([Event("b", TOKEN, token=9, id="x")])
    assert again.pool.snapshot("b").history.tolist() == [5, 7, 9]
    assert sum(again.pool.conversions.values()) == 0  # same version: nothing to convert
