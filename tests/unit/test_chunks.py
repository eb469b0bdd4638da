"""Token chunks in the engine: streaming == per-token == offline, whatever the chunking.

A chunk (one ``tokens`` message) is one engine event with several token ids: applied in order
within the same packed step as single tokens, answered by one ``*_chunk`` prediction, skipped
wholly when redelivered. Per-token outputs, states and positions must not depend on how a
key's tokens were cut into chunks, batched, or interleaved with other keys.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.engine.assemble import assemble, expand_chunk
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import CHUNK_TYPES, END, RESET, TOKEN, Event
from stream_rnn.engine.exceptions import EngineError
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import Vocab

TOL = 1e-5
VOCAB = Vocab.from_tokens([f"t{i}" for i in range(12)], "token")  # ids 4..15
LABELS = ["x", "y", "z"]
KIND = {"next-token": "next", "tag": "tag", "classify": "estimate"}


def _engine(cell: str, task: str, layers: int = 1, capacity: int = 64, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    labels = LABELS if task != "next-token" else None
    cfg = ModelConfig(
        task=task,
        cell=cell,
        vocab_size=len(VOCAB),
        embed_dim=5,
        hidden_size=7,
        num_layers=layers,
        num_labels=len(labels) if labels else 0,
    )
    manifest = Manifest(
        model_config=cfg.to_dict(),
        vocab=VOCAB.to_dict(),
        weights_sha256="0" * 64,
        version="m-chunks",
        labels=labels,
    )
    model = RecurrentModel(cfg).eval()
    return Engine(model, manifest, capacity=capacity, running_estimate=task == "classify")


def _chunked(rng: random.Random, seqs: dict[str, list[int]], max_chunk: int) -> list[Event]:
    """Every key's tokens cut into random chunks (a lone token: a chunk or a single event at
    random), keys interleaved at random, per-key order kept; offsets 0, 1, ... (partition 0)."""
    pieces: dict[str, list[list[int]]] = {}
    for key, tokens in seqs.items():
        i = 0
        while i < len(tokens):
            n = rng.randint(1, max_chunk)
            pieces.setdefault(key, []).append(tokens[i : i + n])
            i += n
    events: list[Event] = []
    while pieces:
        key = rng.choice(sorted(pieces))
        piece = pieces[key].pop(0)
        if not pieces[key]:
            del pieces[key]
        off = len(events)
        if len(piece) == 1 and rng.random() < 0.5:
            events.append(Event(key, TOKEN, piece[0], f"0:{off}", None, None, 0, off))
        else:
            events.append(Event(key, TOKEN, -1, f"0:{off}", None, None, 0, off, list(piece)))
    return events


def _per_token(preds: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One key's per-token predictions in position order (chunk predictions expanded)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in preds:
        rows = list(expand_chunk(p)) if p["type"] in CHUNK_TYPES else [p]
        out.setdefault(p["key"], []).extend(rows)
    return {k: sorted(v, key=lambda p: p["pos"]) for k, v in out.items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert (a["type"], a["pos"], a["seq"]) == (b["type"], b["pos"], b["seq"])
    if a["type"] == "next":
        pa, pb = a["next"]["probs"], b["next"]["probs"]
        assert max(abs(x - y) for x, y in zip(pa, pb, strict=True)) <= TOL
        if all(x - y > 1e-4 for x, y in zip(pb, pb[1:], strict=False)):  # no near-tie
            assert a["next"]["tokens"] == b["next"]["tokens"]
    elif a["type"] == "tag":
        assert abs(a["prob"] - b["prob"]) <= TOL
    else:
        assert list(a["probs"]) == list(b["probs"]) == LABELS
        assert list(a["probs"].values()) == pytest.approx(list(b["probs"].values()), abs=TOL)


def _state(engine: Engine, key: str) -> torch.Tensor:
    state = engine.pool.gather(engine.pool.lookup([key]))
    return torch.cat([s.flatten() for s in state]) if isinstance(state, tuple) else state.flatten()


@settings(max_examples=40, deadline=None)
@given(
    cell=st.sampled_from(["rnn_tanh", "lstm", "gru"]),
    task=st.sampled_from(["next-token", "tag", "classify"]),
    layers=st.integers(1, 2),
    n_keys=st.integers(1, 7),
    max_chunk=st.integers(1, 9),
    capacity=st.integers(2, 9),
    seed=st.integers(0, 10**6),
)
def test_any_chunking_equals_per_token_and_offline(
    cell: str, task: str, layers: int, n_keys: int, max_chunk: int, capacity: int, seed: int
) -> None:
    rng = random.Random(seed)
    chunked = _engine(cell, task, layers, capacity)
    single = _engine(cell, task, layers, capacity)
    seqs = {f"k{i}": [rng.randrange(4, 16) for _ in range(rng.randint(1, 14))] for i in range(n_keys)}  # fmt: skip
    events = _chunked(rng, seqs, max_chunk)
    preds: list[dict[str, Any]] = []
    i = 0
    while i < len(events):
        size = rng.randint(1, 10)
        result = chunked.process(events[i : i + size])
        assert not result.rejections
        assert result.count == len(result.predictions) == min(size, len(events) - i)
        preds += result.predictions
        i += size
    assert {p["type"] for p in preds} <= {KIND[task], f"{KIND[task]}_chunk"}
    reference: list[dict[str, Any]] = []
    for key, tokens in seqs.items():
        reference += single.process([Event(key, TOKEN, token=t) for t in tokens]).predictions
    got, want = _per_token(preds), _per_token(reference)
    for key, tokens in seqs.items():
        assert [p["pos"] for p in got[key]] == list(range(len(tokens)))
        for a, b in zip(got[key], want[key], strict=True):
            _same(a, b)
        assert (_state(chunked, key) - _state(single, key)).abs().max() <= TOL
        if task == "next-token":  # and the full-sequence forward pass
            with torch.no_grad():
                logits, _ = chunked.model(torch.tensor([tokens]))
            probs = torch.softmax(logits[0], -1).topk(5).values
            for p, row in zip(got[key], probs.tolist(), strict=True):
                assert p["next"]["probs"] == pytest.approx(row, abs=TOL)


def test_a_chunk_is_one_prediction_with_its_token_range() -> None:
    engine = _engine("gru", "next-token")
    engine.process([Event("k", TOKEN, 5, "0:0", 1.5, None, 0, 0)])
    result = engine.process(
        [
            Event("k", TOKEN, -1, "0:1", 2.5, None, 0, 1, [6, 7, 8]),
            Event("j", TOKEN, -1, "0:2", None, None, 0, 2, [9]),
            Event("k", TOKEN, 4, "0:3", None, None, 0, 3),
        ]
    )
    first, lone, after = result.predictions
    assert (first["type"], first["id"], first["pos"], first["pos_to"]) == (
        "next_chunk",
        "0:1",
        1,
        3,
    )
    assert len(first["next"]) == 3 and first["_ts"] == 2.5 and first["seq"] == 0
    assert (lone["type"], lone["pos"], lone["pos_to"], len(lone["next"])) == ("next_chunk", 0, 0, 1)
    assert (after["type"], after["pos"]) == ("next", 4)
    assert result.tokens == 5 and engine.pool.pos[engine.pool.slot_of["k"]] == 5


def test_redelivered_chunks_are_skipped_wholly() -> None:
    engine = _engine("lstm", "next-token")
    events = [
        Event("k", TOKEN, -1, "0:10", None, None, 0, 10, [5, 6, 7]),
        Event("j", TOKEN, 8, "0:11", None, None, 0, 11),
        Event("k", TOKEN, -1, "0:12", None, None, 0, 12, [9, 10]),
    ]
    engine.process(events)
    state, pos = _state(engine, "k").clone(), int(engine.pool.pos[engine.pool.slot_of["k"]])
    again = engine.process(events)  # redelivered after a restart: all already applied
    assert again.skipped == 3 and not again.predictions and again.tokens == 0
    assert torch.equal(_state(engine, "k"), state) and pos == 5
    # a redelivered chunk next to a new one: the old one is skipped, the new one applied
    mixed = engine.process([events[2], Event("k", TOKEN, -1, "0:13", None, None, 0, 13, [4, 4])])
    assert mixed.skipped == 1 and [p["id"] for p in mixed.predictions] == ["0:13"]
    assert (mixed.predictions[0]["pos"], mixed.predictions[0]["pos_to"]) == (5, 6)
    assert int(engine.pool.applied[engine.pool.slot_of["k"]]) == 13


def test_controls_see_exactly_the_chunks_before_them() -> None:
    engine = _engine("gru", "next-token")
    result = engine.process(
        [
            Event("k", TOKEN, -1, "0:0", tokens=[5, 6]),
            Event("k", END, id="0:1"),
            Event("k", TOKEN, -1, "0:2", tokens=[7, 8, 9]),
            Event("k", RESET, id="0:3"),
            Event("k", TOKEN, -1, "0:4", tokens=[4]),
        ]
    )
    assert [(p["type"], p.get("pos"), p["seq"]) for p in result.predictions] == [
        ("next_chunk", 0, 0),
        ("end", None, 0),
        ("next_chunk", 0, 0),
        ("reset", None, 1),
        ("next_chunk", 0, 1),
    ]
    assert result.predictions[1]["n_tokens"] == 2
    lines = assemble(result.predictions, "next-token")
    assert [len(lines[("k", n)]["next"]) for n in range(3)] == [2, 3, 1]


def test_chunk_history_feeds_a_rewarm() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=len(VOCAB), hidden_size=6)
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=VOCAB.to_dict(), weights_sha256="0" * 64, version="a"
    )
    engine = Engine(RecurrentModel(cfg).eval(), manifest, capacity=4, history=4)
    engine.process([Event("k", TOKEN, -1, "0:0", tokens=[5, 6, 7, 8, 9, 10])])
    ids, lengths = engine.pool.history.rows(engine.pool.lookup(["k"]))  # type: ignore[union-attr]
    assert ids.tolist() == [[7, 8, 9, 10]] and lengths.tolist() == [4]


def test_an_empty_chunk_is_refused_with_a_reason() -> None:
    engine = _engine("gru", "next-token")
    with pytest.raises(EngineError, match="at least one token"):
        engine.process([Event("k", TOKEN, -1, "0:0", tokens=[])])


def test_many_keys_of_long_chunks_over_capacity() -> None:
    engine = _engine("gru", "next-token", capacity=3)
    rng = random.Random(4)
    seqs = {f"k{i}": [rng.randrange(4, 16) for _ in range(20)] for i in range(8)}
    events = [Event(k, TOKEN, -1, f"0:{i}", tokens=v) for i, (k, v) in enumerate(seqs.items())]
    result = engine.process(events)
    assert len(result.predictions) == 8 and engine.pool.evictions >= 5
    for p in result.predictions:
        with torch.no_grad():
            logits, _ = engine.model(torch.tensor([seqs[p["key"]]]))
        want = torch.softmax(logits[0], -1).topk(5).values.tolist()
        assert [e["probs"] for e in p["next"]] == [pytest.approx(w, abs=TOL) for w in want]
