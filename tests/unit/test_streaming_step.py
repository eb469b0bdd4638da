"""The central contract: streaming step == full-sequence pass == torch.nn reference == equations.

Property-based: every cell type, 1-3 layers, random weights, random lengths, random chunkings
(different token counts per key in the same call; keys drop out when they run out).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stream_rnn.model import ModelConfig, RecurrentModel, select_state
from stream_rnn.model.reference import reference_forward

TOL = 1e-5
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def _torch_reference(model: RecurrentModel, tokens: torch.Tensor):
    """Plain torch.nn modules loaded with the checkpoint's plain names."""
    cfg = model.config
    sd = model.state_dict()
    emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
    emb.load_state_dict({"weight": sd["embedding.weight"]})
    kind = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cfg.cell, nn.RNN)
    kwargs = {"nonlinearity": cfg.cell.split("_")[1]} if kind is nn.RNN else {}
    rnn = kind(cfg.embed_dim, cfg.hidden_size, cfg.num_layers, batch_first=True, **kwargs)
    rnn.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
    dec = nn.Linear(cfg.hidden_size, cfg.output_size)
    dec.load_state_dict({"weight": sd["decoder.weight"], "bias": sd["decoder.bias"]})
    with torch.no_grad():
        out, h_n = rnn(emb(tokens))
        return dec(out), h_n


def _h(state):
    return state[0] if isinstance(state, tuple) else state


@st.composite
def scenario(draw):
    cell = draw(st.sampled_from(CELLS))
    layers = draw(st.integers(1, 3))
    hidden = draw(st.integers(1, 24))
    embed = draw(st.integers(1, 12))
    vocab = draw(st.integers(5, 40))
    keys = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 14), min_size=keys, max_size=keys))
    seed = draw(st.integers(0, 2**31 - 1))
    chunk_seed = draw(st.integers(0, 2**31 - 1))
    return cell, layers, hidden, embed, vocab, lengths, seed, chunk_seed


@settings(max_examples=120, deadline=None)
@given(scenario())
def test_chunked_streaming_equals_full_pass_and_torch(params):
    cell, layers, hidden, embed, vocab, lengths, seed, chunk_seed = params
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="next-token",
        cell=cell,
        vocab_size=vocab,
        embed_dim=embed,
        hidden_size=hidden,
        num_layers=layers,
    )
    model = RecurrentModel(cfg).eval()
    # Random weights at twice PyTorch's default scale, so saturation and ReLU paths are
    # exercised while activations stay O(1..10): an absolute 1e-5 bound is float32 rounding
    # only for values of that size (exploding ReLU states would test float32, not our code).
    # ReLU cells get PyTorch's own scale: larger recurrent weights make them explode.
    bound = (1.0 if cell == "rnn_relu" else 2.0) / hidden**0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-bound, bound) if name.startswith("rnn.") else p.normal_(0.0, 1.0)
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    rng = torch.Generator().manual_seed(chunk_seed)

    # Stream: each call advances a random subset of the unfinished keys by random counts.
    pos = [0] * len(seqs)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    pool = model.init_state(len(seqs))
    while any(p < len(s) for p, s in zip(pos, seqs, strict=True)):
        active = [i for i, s in enumerate(seqs) if pos[i] < len(s)]
        pick = [i for i in active if torch.rand(1, generator=rng).item() < 0.7] or active[:1]
        counts = [
            int(torch.randint(1, len(seqs[i]) - pos[i] + 1, (1,), generator=rng)) for i in pick
        ]
        width = max(counts)
        batch = torch.zeros((len(pick), width), dtype=torch.long)
        for row, (i, c) in enumerate(zip(pick, counts, strict=True)):
            batch[row, :c] = seqs[i][pos[i] : pos[i] + c]
        idx = torch.tensor(pick)
        logits, new = model.step(batch, select_state(pool, idx), torch.tensor(counts))
        for row, (i, c) in enumerate(zip(pick, counts, strict=True)):
            outs[i].append(logits[row, :c])
            pos[i] += c
        # one indexed write back, as the engine's pool does
        if isinstance(pool, tuple):
            pool[0][:, idx] = new[0]
            pool[1][:, idx] = new[1]
        else:
            pool[:, idx] = new

    for i, seq in enumerate(seqs):
        streamed = torch.cat(outs[i])
        with torch.no_grad():
            full, h_full = model(seq[None])
        ref, h_ref = _torch_reference(model, seq[None])
        eq, h_eq, c_eq = reference_forward(cfg, dict(model.state_dict()), seq[None])
        final = select_state(pool, torch.tensor([i]))
        assert (streamed - full[0]).abs().max() <= TOL
        assert (streamed - ref[0]).abs().max() <= TOL
        assert (streamed - eq[0]).abs().max() <= TOL
        assert (_h(final) - _h(h_full)).abs().max() <= TOL
        assert (_h(final) - _h(h_ref)).abs().max() <= TOL
        assert (_h(final) - h_eq).abs().max() <= TOL
        if cell == "lstm":
            assert (final[1] - h_full[1]).abs().max() <= TOL
            assert (final[1] - c_eq).abs().max() <= TOL


@settings(max_examples=40, deadline=None)
@given(
    cell=st.sampled_from(CELLS),
    layers=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_classifier_running_estimate_ends_at_offline_label(cell, layers, lengths, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="classify",
        cell=cell,
        vocab_size=20,
        embed_dim=6,
        hidden_size=10,
        num_layers=layers,
        num_labels=3,
    )
    model = RecurrentModel(cfg).eval()
    width = max(lengths)
    tokens = torch.randint(0, 20, (len(lengths), width))
    lens = torch.tensor(lengths)
    with torch.no_grad():
        offline = model.classify(tokens, lens)
    state = model.init_state(len(lengths))
    logits, state = model.step(tokens, state, lens)
    last = logits[torch.arange(len(lengths)), lens - 1]
    assert (last - offline).abs().max() <= TOL
    assert (model.head(state) - offline).abs().max() <= TOL


def test_bidirectional_model_refuses_to_stream():
    import pytest

    from stream_rnn.model import StreamingNotSupportedError

    cfg = ModelConfig(task="classify", cell="gru", vocab_size=10, num_labels=2, bidirectional=True)
    model = RecurrentModel(cfg)
    with pytest.raises(StreamingNotSupportedError, match="future tokens"):
        model.step(torch.tensor([[5]]), None)


def test_step_rejects_zero_length_rows():
    import pytest

    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=10)
    model = RecurrentModel(cfg)
    with pytest.raises(ValueError, match="at least one token"):
        model.step(torch.tensor([[5, 6]]), None, torch.tensor([0]))
