"""The engine's ragged step (no padding, per-token outputs) == model.step on a padded grid."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.engine.ragged import group_slots, long_tensor, step_ragged
from stream_rnn.model import ModelConfig, RecurrentModel, select_state

TOL = 1e-5


def _h(state):
    return state[0] if isinstance(state, tuple) else state


@settings(max_examples=80, deadline=None)
@given(
    cell=st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru"]),
    layers=st.integers(1, 3),
    n_keys=st.integers(1, 12),
    n_tokens=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_ragged_step_equals_padded_step(cell, layers, n_keys, n_tokens, seed):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = ModelConfig(
        task="next-token", cell=cell, vocab_size=15, embed_dim=4, hidden_size=6, num_layers=layers
    )
    model = RecurrentModel(cfg).eval()
    # tokens of random keys in arrival order; keys numbered in the order of their first token
    names = [rng.randrange(n_keys) for _ in range(n_tokens)]
    index: dict[int, int] = {}
    inv_list = [index.setdefault(k, len(index)) for k in names]
    k = len(index)
    tokens = [rng.randrange(15) for _ in range(n_tokens)]
    state = model.init_state(k)
    state = (
        (torch.randn_like(state[0]), torch.randn_like(state[1]))
        if isinstance(state, tuple)
        else torch.randn_like(state)
    )
    # the keys live at random pool slots; group_slots hands them back in its batch order
    slot_of_key = torch.tensor(rng.sample(range(50), k))
    key_at = torch.full((50,), -1, dtype=torch.long)
    key_at[slot_of_key] = torch.arange(k)
    scratch = torch.full((50,), 7, dtype=torch.long)
    slots, groups = group_slots(slot_of_key[torch.tensor(inv_list)], scratch)
    assert sorted(slots.tolist()) == sorted(slot_of_key.tolist())
    keys = key_at[slots]  # key of each state row handed to step_ragged
    feats, new = step_ragged(model, long_tensor(tokens), select_state(state, keys), groups)
    if groups.packed is not None:  # rows in packed order: back to arrival order
        feats = torch.empty_like(feats).index_copy_(0, groups.packed, feats)
    back = torch.empty_like(keys)
    back[keys] = torch.arange(k)
    new = select_state(new, back)  # key order again

    rank = [0] * n_tokens
    seen: dict[int, int] = {}
    for i, key in enumerate(inv_list):
        rank[i] = seen.get(key, 0)
        seen[key] = rank[i] + 1
    width = max(rank) + 1
    grid = torch.zeros((k, width), dtype=torch.long)
    grid[torch.tensor(inv_list), torch.tensor(rank)] = torch.tensor(tokens)
    counts = torch.bincount(torch.tensor(inv_list), minlength=k)
    ref_out, ref_state = model.step_features(grid, state, counts)
    ref = ref_out[torch.tensor(inv_list), torch.tensor(rank)]
    assert feats.shape == (n_tokens, cfg.hidden_size)
    assert (feats - ref).abs().max() <= TOL
    assert (_h(new) - _h(ref_state)).abs().max() <= TOL
    if isinstance(new, tuple):
        assert (new[1] - ref_state[1]).abs().max() <= TOL
    # the padded positions of step_features stay zero
    pad = torch.arange(width).view(1, -1) >= counts.view(-1, 1)
    assert bool((ref_out[pad] == 0).all())
    # the layout describes the batch
    if groups.rank is None:
        assert width == 1
    else:
        assert groups.rank.tolist() == rank
        assert groups.batch_sizes is not None and groups.batch_sizes.tolist() == [
            int((counts > t).sum()) for t in range(width)
        ]
        # keys with the most tokens first (ties: by first token), then the others by first token
        # (keys are numbered by first token)
        multi = sorted((key for key in range(k) if counts[key] > 1), key=lambda g: -int(counts[g]))
        singles = [key for key in range(k) if counts[key] == 1]
        assert keys.tolist() == multi + singles


def test_long_tensor():
    assert long_tensor([]).dtype == torch.long and long_tensor([]).numel() == 0
    assert long_tensor([3, -1, 2**40]).tolist() == [3, -1, 2**40]


def test_engine_with_a_wide_vocabulary_equals_offline():
    """Big batches (the fast top-k path), several tokens per key per batch, and offline."""
    from stream_rnn.engine.engine import Engine
    from stream_rnn.engine.events import TOKEN, Event
    from stream_rnn.registry.checkpoint import Manifest
    from stream_rnn.train.vocab import Vocab

    torch.manual_seed(1)
    rng = random.Random(1)
    vocab = Vocab.from_tokens([f"t{i}" for i in range(296)], "token")
    cfg = ModelConfig(
        task="next-token", cell="lstm", vocab_size=len(vocab), embed_dim=8, hidden_size=16
    )
    model = RecurrentModel(cfg).eval()
    with torch.no_grad():
        model.decoder.weight.mul_(8.0)  # peaked distributions: no near-ties in the top 5
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=vocab.to_dict(), weights_sha256="0" * 64, version="v"
    )
    engine = Engine(model, manifest, capacity=64)
    seqs: dict[str, list[int]] = {f"k{i}": [] for i in range(40)}
    events = []
    for i in range(600):
        key = rng.choice(sorted(seqs))
        token = rng.randrange(4, len(vocab))
        seqs[key].append(token)
        events.append(Event(key, TOKEN, token=token, id=f"0:{i}"))
    preds = []
    for start in range(0, len(events), 150):
        preds.extend(engine.process(events[start : start + 150]).predictions)
    checked = 0
    for key, tokens in seqs.items():
        got = sorted((p for p in preds if p["key"] == key), key=lambda p: p["pos"])
        assert [p["pos"] for p in got] == list(range(len(tokens)))
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([tokens]))[0][0], -1)
        for p, row in zip(got, probs, strict=True):
            top = row.topk(6)
            values = top.values[:5].tolist()
            assert max(abs(a - b) for a, b in zip(p["next"]["probs"], values, strict=True)) <= TOL
            if bool((top.values[:-1] - top.values[1:] > 1e-4).all()):
                assert p["next"]["tokens"] == vocab.decode(top.indices[:5].tolist())
                checked += 1
    assert checked > len(events) // 2
