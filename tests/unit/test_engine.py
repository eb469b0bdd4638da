"""The engine keeps streaming == offline under any interleaving, batching and eviction."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import END, GENERATE, RESET, TOKEN, Event, GenerateParams
from stream_rnn.engine.simulate import simulate
from stream_rnn.model import ModelConfig, RecurrentModel, generate
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.data import Record
from stream_rnn.train.synthetic import generate_split
from stream_rnn.train.vocab import LabelSet, Vocab

TOL = 1e-5
VOCAB = Vocab.from_tokens([f"t{i}" for i in range(12)], "token")


def _engine(
    cell: str = "gru", task: str = "next-token", layers: int = 2, labels=None, **kw
) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(
        task=task,
        cell=cell,
        vocab_size=len(VOCAB),
        embed_dim=5,
        hidden_size=7,
        num_layers=layers,
        num_labels=len(labels) if labels else 0,
    )
    model = RecurrentModel(cfg).eval()
    manifest = Manifest(
        model_config=cfg.to_dict(),
        vocab=VOCAB.to_dict(),
        weights_sha256="0" * 64,
        version="m-test",
        labels=labels,
    )
    return Engine(model, manifest, **kw)


def _offline(engine: Engine, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([tokens]))
    return torch.softmax(logits[0], -1)


@settings(max_examples=60, deadline=None)
@given(
    cell=st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru"]),
    layers=st.integers(1, 3),
    n_keys=st.integers(1, 8),
    capacity=st.integers(1, 9),
    seed=st.integers(0, 10**6),
)
def test_any_interleaving_batching_and_eviction_equals_offline(
    cell, layers, n_keys, capacity, seed
):
    rng = random.Random(seed)
    engine = _engine(cell, layers=layers, capacity=capacity)
    seqs = {
        f"k{i}": [rng.randrange(4, 12) for _ in range(rng.randint(1, 9))] for i in range(n_keys)
    }
    streams = {k: list(v) for k, v in seqs.items()}
    events: list[Event] = []
    while streams:
        key = rng.choice(sorted(streams))
        events.append(Event(key, TOKEN, token=streams[key].pop(0), id=f"0:{len(events)}"))
        if not streams[key]:
            del streams[key]
    preds = []
    i = 0
    while i < len(events):
        size = rng.randint(1, 12)
        result = engine.process(events[i : i + size])
        assert not result.rejections
        preds.extend(result.predictions)
        i += size
    assert len(preds) == len(events)
    by_key: dict[str, list[dict]] = {}
    for p in preds:
        by_key.setdefault(p["key"], []).append(p)
    for key, tokens in seqs.items():
        got = sorted(by_key[key], key=lambda p: p["pos"])
        assert [p["pos"] for p in got] == list(range(len(tokens)))
        probs = _offline(engine, tokens)
        for p, row in zip(got, probs, strict=True):
            top = row.topk(5)
            assert p["next"]["tokens"] == VOCAB.decode(top.indices.tolist())
            assert (
                max(
                    abs(a - b) for a, b in zip(p["next"]["probs"], top.values.tolist(), strict=True)
                )
                <= TOL
            )
        # final state equals the full pass's final state
        with torch.no_grad():
            _, h_n = engine.model(torch.tensor([tokens]))
        state = engine.pool.gather(engine.pool.lookup([key]))
        h = state[0] if isinstance(state, tuple) else state
        ref = h_n[0] if isinstance(h_n, tuple) else h_n
        assert (h - ref).abs().max() <= TOL


def test_controls_within_one_batch_keep_per_key_order() -> None:
    engine = _engine("lstm")
    events = [
        Event("a", TOKEN, token=5, id="0:0"),
        Event("a", TOKEN, token=6, id="0:1"),
        Event("a", END, id="0:2"),
        Event("a", TOKEN, token=7, id="0:3"),  # a new sequence of the same key
        Event("b", TOKEN, token=8, id="0:4"),
        Event("b", RESET, id="0:5"),
        Event("b", TOKEN, token=9, id="0:6"),
    ]
    result = engine.process(events)
    assert not result.rejections
    by_id = {(p["id"], p["type"]): p for p in result.predictions}
    assert by_id[("0:2", "end")]["n_tokens"] == 2 and by_id[("0:2", "end")]["seq"] == 0
    second = by_id[("0:3", "next")]
    assert second["seq"] == 0 and second["pos"] == 0  # end deleted the key: a new state
    fresh = _offline(engine, [7])[0].topk(5)
    assert second["next"]["probs"] == pytest.approx(fresh.values.tolist(), abs=TOL)
    assert by_id[("0:5", "reset")]["seq"] == 1 and by_id[("0:6", "next")]["seq"] == 1


def test_unknown_keys_and_bad_controls_are_rejected_not_raised() -> None:
    engine = _engine(labels=None)
    result = engine.process([Event("ghost", END, id="0:0"), Event("ghost", RESET, id="0:1")])
    assert [r.reason for r in result.rejections] == ["unknown_key", "unknown_key"]
    assert "no state" in result.rejections[0].detail
    engine.process([Event("k", TOKEN, token=5), Event("k", END)])
    again = engine.process([Event("k", END, id="0:9")])  # end deleted the key
    assert again.rejections[0].reason == "unknown_key" and "no state" in again.rejections[0].detail
    engine.process([Event("k", TOKEN, token=5), Event("k", RESET)])
    empty = engine.process([Event("k", END, id="0:12")])
    assert (
        empty.rejections[0].reason == "unknown_key"
        and "no open sequence" in empty.rejections[0].detail
    )
    classifier = _engine(task="classify", labels=["x", "y"])
    classifier.process([Event("k", TOKEN, token=5)])
    bad = classifier.process([Event("k", GENERATE, gen=GenerateParams(n=3))])
    assert (
        bad.rejections[0].reason == "bad_value" and "next-token model" in bad.rejections[0].detail
    )


def test_generate_continues_from_the_key_state_without_changing_it() -> None:
    engine = _engine("gru")
    engine.process([Event("k", TOKEN, token=t) for t in (5, 6, 7)])
    before = engine.pool.gather(engine.pool.lookup(["k"])).clone()
    result = engine.process(
        [Event("k", GENERATE, id="0:3", gen=GenerateParams(n=6, seed=4, temperature=0.9))]
    )
    (pred,) = result.predictions
    expected = generate(engine.model, [5, 6, 7], 6, seed=4, temperature=0.9)
    assert pred["type"] == "generated" and pred["tokens"] == VOCAB.decode(expected)
    assert torch.equal(engine.pool.gather(engine.pool.lookup(["k"])), before)


def test_classifier_end_label_and_running_estimate_match_offline() -> None:
    engine = _engine("lstm", task="classify", labels=["x", "y", "z"], running_estimate=True)
    tokens = [5, 9, 4, 11]
    result = engine.process(
        [Event("k", TOKEN, token=t, id=f"0:{i}") for i, t in enumerate(tokens)]
        + [Event("k", END, id="0:4")]
    )
    estimates = [p for p in result.predictions if p["type"] == "estimate"]
    (label,) = [p for p in result.predictions if p["type"] == "label"]
    with torch.no_grad():
        offline = torch.softmax(engine.model.classify(torch.tensor([tokens]))[0], -1).tolist()
    assert len(estimates) == 4
    assert list(estimates[-1]["probs"].values()) == pytest.approx(offline, abs=TOL)
    assert list(label["probs"].values()) == pytest.approx(offline, abs=TOL)


def test_more_distinct_keys_than_capacity_in_one_batch() -> None:
    engine = _engine("gru", capacity=3)
    events = [Event(f"k{i}", TOKEN, token=4 + i % 8, id=f"0:{i}") for i in range(10)] * 2
    result = engine.process(events)
    assert len(result.predictions) == 20 and engine.pool.evictions >= 7


def test_bidirectional_models_are_refused() -> None:
    from stream_rnn.model import StreamingNotSupportedError

    cfg = ModelConfig(
        task="classify", cell="gru", vocab_size=len(VOCAB), num_labels=2, bidirectional=True
    )
    manifest = Manifest(
        model_config=cfg.to_dict(),
        vocab=VOCAB.to_dict(),
        weights_sha256="0",
        version="v",
        labels=["a", "b"],
    )
    with pytest.raises(StreamingNotSupportedError, match="future tokens"):
        Engine(RecurrentModel(cfg), manifest)


@pytest.mark.parametrize("task", ["next-token", "classify", "tag", "seq2seq"])
def test_simulate_agrees_with_offline_score(task: str) -> None:
    split = generate_split(task, 0, 0, 25, seed=2)
    records: list[Record] = (
        split.test + split.test[:3]
    )  # repeated keys: sequences one after another
    items = [r.items("char") for r in records] + [
        r.target_items("char") for r in records if r.target
    ]
    vocab = Vocab.build(items, "char")
    labels = None
    if task == "classify":
        labels = LabelSet.build(str(r.label) for r in records).labels
    elif task == "tag":
        labels = LabelSet.build(t for r in records for t in r.tags or []).labels
    torch.manual_seed(1)
    cfg = ModelConfig(
        task=task,
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=8,
        hidden_size=16,
        num_labels=len(labels) if labels else 0,
    )
    model = RecurrentModel(cfg).eval()
    manifest = Manifest(
        model_config=cfg.to_dict(),
        vocab=vocab.to_dict(),
        weights_sha256="0",
        version="m-sim",
        labels=list(labels) if labels else None,
    )
    engine = Engine(model, manifest, capacity=7)
    simulated = simulate(engine, records, batch=16, seed=3)
    offline = list(score_records(model, manifest, records))
    assert len(simulated) == len(offline)
    for a, b in zip(simulated, offline, strict=True):
        assert a["key"] == b["key"] and a["model_version"] == b["model_version"]
        if task == "next-token":
            for x, y in zip(a["next"], b["next"], strict=True):
                assert x["tokens"] == y["tokens"]
                assert x["probs"] == pytest.approx(y["probs"], abs=TOL)
        elif task == "classify":
            assert a["label"] == b["label"]
            assert list(a["probs"].values()) == pytest.approx(list(b["probs"].values()), abs=TOL)
        elif task == "tag":
            assert a["tags"] == b["tags"]
            assert a["tag_probs"] == pytest.approx(b["tag_probs"], abs=TOL)
        else:
            assert a["output"] == b["output"]


def _with_offsets(events: list[Event], partition: int = 0) -> list[Event]:
    for i, e in enumerate(events):
        e.partition, e.offset, e.id = partition, i, f"{partition}:{i}"
    return events


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_redelivered_events_are_applied_exactly_once(cell: str) -> None:
    """A restart replays from an older committed offset: the state must not double-apply."""
    rng = random.Random(5)
    tokens = {f"k{i}": [rng.randrange(4, 12) for _ in range(rng.randint(3, 8))] for i in range(5)}
    queues = {k: list(v) for k, v in tokens.items()}
    events = []
    while queues:  # random interleaving that keeps each key's order
        k = rng.choice(sorted(queues))
        events.append(Event(k, TOKEN, token=queues[k].pop(0)))
        if not queues[k]:
            del queues[k]
    events = _with_offsets(events)
    engine = _engine(cell, capacity=3)  # small pool: restores go through the store
    engine.process(events[:20])
    replay = engine.process(events[5:])  # committed offset was 5: 15 events come again
    assert replay.skipped == 15
    assert {p["id"] for p in replay.predictions} == {e.id for e in events[20:]}
    for key, seq in tokens.items():
        with torch.no_grad():
            _, h_n = engine.model(torch.tensor([seq]))
        state = engine.pool.gather(engine.pool.lookup([key]))
        h = state[0] if isinstance(state, tuple) else state
        ref = h_n[0] if isinstance(h_n, tuple) else h_n
        assert (h - ref).abs().max() <= TOL
    again = engine.process([Event("k0", END, id="0:99", offset=99, partition=0)])
    assert again.predictions[0]["type"] == "end"
    # end deleted k0, so a redelivered end finds no state: rejected, never applied twice
    # (under exactly-once it cannot come: the tombstone and the offset commit together)
    dup = engine.process([Event("k0", END, id="0:99", offset=99, partition=0)])
    assert not dup.predictions and [r.reason for r in dup.rejections] == ["unknown_key"]
    assert not engine.pool.known("k0")


def test_dirty_states_and_partition_drop() -> None:
    engine = _engine("gru")
    engine.process(
        [
            Event("a", TOKEN, token=5, offset=0, partition=0, id="0:0"),
            Event("b", TOKEN, token=6, offset=0, partition=1, id="1:0"),
        ]
    )
    dirty = dict(engine.pool.take_dirty(partition=1))
    assert set(dirty) == {"b"} and dirty["b"].offset == 0 and dirty["b"].partition == 1
    assert engine.pool.take_dirty(partition=1) == []
    assert [k for k, _ in engine.pool.take_dirty()] == ["a"]
    assert engine.pool.drop_partition(0) == 1 and "a" not in engine.pool and "b" in engine.pool


def test_offsets_of_another_partition_never_skip() -> None:
    engine = _engine("gru")
    engine.process([Event("k", TOKEN, token=5, offset=50, partition=0, id="0:50")])
    other = engine.process([Event("k", TOKEN, token=6, offset=3, partition=1, id="1:3")])
    assert other.skipped == 0 and other.count == 1


def test_tiny_temperatures_sample_the_argmax() -> None:
    engine = _engine("gru")
    engine.process([Event("k", TOKEN, token=5)])
    tiny = engine.process(
        [Event("k", GENERATE, gen=GenerateParams(n=4, temperature=1e-300, seed=1))]
    )
    greedy = engine.process([Event("k", GENERATE, gen=GenerateParams(n=4, greedy=True))])
    assert tiny.predictions[0]["tokens"] == greedy.predictions[0]["tokens"]


def test_an_empty_pool_given_to_the_engine_is_the_one_it_uses(tmp_path) -> None:
    """A fresh pool is empty (len 0, falsy): the engine must still keep it and its store.

    The worker hands the engine a pool backed by its on-disk store, into which restores load
    the checkpointed states; a replaced pool would start every restored key from zero.
    """
    from stream_rnn.engine.diskstore import DiskStateStore
    from stream_rnn.engine.pool import StatePool
    from stream_rnn.engine.store import StoredState

    probe = _engine("gru")
    store = DiskStateStore(tmp_path / "states.db")
    pool = StatePool(probe.model.config, 4, store=store)
    engine = _engine("gru", pool=pool)
    assert engine.pool is pool and engine.pool.store is store
    with torch.no_grad():
        _, h = engine.model(torch.tensor([[5, 6]]))
    store.put_restored("k", StoredState(h[:, 0], None, seq=0, pos=2, offset=1, partition=0))
    out = engine.process([Event("k", TOKEN, token=7, offset=2, partition=0, id="0:2")])
    assert out.predictions[0]["pos"] == 2
    best = float(_offline(engine, [5, 6, 7])[2].max())
    assert abs(out.predictions[0]["next"]["probs"][0] - best) <= TOL
    store.close()


def _h(state) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_end_deletes_the_key_and_its_next_token_starts_a_fresh_state(cell: str) -> None:
    engine = _engine(cell, capacity=2)
    out = engine.process(
        _with_offsets([Event("k", TOKEN, token=t) for t in (5, 6, 7)] + [Event("k", END)])
    )
    (end,) = [p for p in out.predictions if p["type"] == "end"]
    assert (end["id"], end["seq"], end["n_tokens"]) == ("0:3", 0, 3)
    assert not engine.pool.known("k") and len(engine.pool) == 0 and len(engine.pool.store) == 0
    # a tombstone for the checkpointer: key, source partition, the offset of the end
    assert engine.pool.take_deleted() == [("k", 0, 3)] and engine.pool.take_deleted() == []
    again = [
        Event("k", TOKEN, token=t, id=f"0:{4 + i}", partition=0, offset=4 + i)
        for i, t in enumerate((8, 9))
    ]
    out = engine.process(again)
    assert [(p["seq"], p["pos"]) for p in out.predictions] == [(0, 0), (0, 1)]
    for p, row in zip(out.predictions, _offline(engine, [8, 9]), strict=True):
        assert p["next"]["probs"] == pytest.approx(row.topk(5).values.tolist(), abs=TOL)
    with torch.no_grad():
        _, h_n = engine.model(torch.tensor([[8, 9]]))
    assert (_h(engine.pool.gather(engine.pool.lookup(["k"]))) - _h(h_n)).abs().max() <= TOL
    slot = engine.pool.slot_of["k"]
    assert int(engine.pool.seq[slot]) == 0 and int(engine.pool.pos[slot]) == 2


def test_end_of_a_stored_key_deletes_its_pending_copy(tmp_path) -> None:
    from stream_rnn.engine.diskstore import DiskStateStore
    from stream_rnn.engine.pool import StatePool

    probe = _engine("gru")
    store = DiskStateStore(tmp_path / "states.db")
    engine = _engine("gru", pool=StatePool(probe.model.config, 1, store=store))
    engine.process(_with_offsets([Event("a", TOKEN, token=5), Event("b", TOKEN, token=6)]))
    assert "a" in store and "a" in store.pending  # evicted by b, waiting for a checkpoint
    out = engine.process([Event("a", END, id="0:2", partition=0, offset=2)])
    assert out.predictions[0]["type"] == "end" and out.predictions[0]["n_tokens"] == 1
    assert not engine.pool.known("a") and "a" not in store.pending
    assert engine.pool.take_deleted(partition=0) == [("a", 0, 2)]
    assert [k for k, _ in store.take_pending()] == ["b"]  # b was evicted by a's return
    store.close()


def test_a_key_started_again_before_the_checkpoint_needs_no_tombstone() -> None:
    engine = _engine("gru")
    engine.process(
        _with_offsets([Event("k", TOKEN, token=5), Event("k", END), Event("k", TOKEN, token=6)], 3)
    )
    assert engine.pool.take_deleted() == []
    ((key, state),) = engine.pool.take_dirty(partition=3)
    assert key == "k" and (state.seq, state.pos, state.offset, state.partition) == (0, 1, 2, 3)
    with torch.no_grad():
        _, h_n = engine.model(torch.tensor([[6]]))
    assert (state.h - h_n[:, 0]).abs().max() <= TOL


def test_engine_passes_the_retention_to_its_pool() -> None:
    from stream_rnn.engine.exceptions import PoolError

    assert _engine(ttl_s=10, retention_s=60).pool.retention_s == 60
    with pytest.raises(PoolError, match="shorter than the memory TTL"):
        _engine(ttl_s=60, retention_s=10)
