"""One-to-many generation and seq2seq decoding."""

from __future__ import annotations

import pytest
import torch

from stream_rnn.model import ModelConfig, ModelError, RecurrentModel, continue_from, generate
from stream_rnn.model.generate import translate


@pytest.fixture
def lm() -> RecurrentModel:
    torch.manual_seed(3)
    return RecurrentModel(ModelConfig(task="next-token", cell="lstm", vocab_size=20)).eval()


def test_seeded_sampling_is_reproducible_and_seeds_differ(lm: RecurrentModel) -> None:
    a = generate(lm, [5, 6, 7], 30, temperature=1.5, seed=1)
    assert a == generate(lm, [5, 6, 7], 30, temperature=1.5, seed=1)
    assert a != generate(lm, [5, 6, 7], 30, temperature=1.5, seed=2)
    assert len(a) == 30 and all(0 <= t < 20 for t in a)


def test_greedy_follows_argmax_and_top1_equals_greedy(lm: RecurrentModel) -> None:
    greedy = generate(lm, [5], 10, greedy=True)
    expected, seq = [], [5]
    for _ in range(10):
        with torch.no_grad():
            logits, _ = lm(torch.tensor([seq]))
        expected.append(int(logits[0, -1].argmax()))
        seq.append(expected[-1])
    assert greedy == expected
    assert generate(lm, [5], 10, top_k=1, seed=9) == greedy


def test_top_k_restricts_candidates(lm: RecurrentModel) -> None:
    state = lm.init_state(1)
    _, state = lm.step(torch.tensor([[4, 9]]), state)
    allowed = set(lm.head(state)[0].topk(3).indices.tolist())
    firsts = {int(continue_from(lm, state, 1, top_k=3, seed=s)[0, 0]) for s in range(60)}
    assert firsts <= allowed and len(firsts) > 1


def test_generation_leaves_the_state_untouched(lm: RecurrentModel) -> None:
    _, state = lm.step(torch.tensor([[4, 9, 11]]), lm.init_state(1))
    before = (state[0].clone(), state[1].clone())
    continue_from(lm, state, 15, seed=0)
    assert torch.equal(state[0], before[0]) and torch.equal(state[1], before[1])


def test_bad_sampling_arguments(lm: RecurrentModel) -> None:
    with pytest.raises(ModelError, match="temperature must be > 0"):
        generate(lm, [5], 3, temperature=0.0)
    with pytest.raises(ModelError, match="n must be >= 0"):
        continue_from(lm, lm.init_state(1), -1)


def test_translate_stops_at_eos_and_initialises_from_encoder() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(task="seq2seq", cell="gru", vocab_size=12, bidirectional=True)
    model = RecurrentModel(cfg).eval()
    with torch.no_grad():
        model.decoder.bias.fill_(-50.0)
        model.decoder.bias[3] = 50.0  # <eos> always wins
    src = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = translate(model, model.encode(src), bos_id=2, eos_id=3, max_len=10)
    assert out == [[], []]
    with torch.no_grad():
        model.decoder.bias.zero_()
    out = translate(model, model.encode(src), bos_id=2, eos_id=3, max_len=7)
    assert all(len(row) <= 7 for row in out)
