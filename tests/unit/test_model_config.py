"""Model configuration: one dataclass, validated with messages that say what to do."""

from __future__ import annotations

import pytest

from stream_rnn.model import ModelConfig, ModelConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(task="lm"), "choose one of next-token"),
        (dict(cell="transformer"), "choose one of rnn_tanh"),
        (dict(hidden_size=0), "hidden_size=0 is invalid"),
        (dict(num_layers=1, dropout=0.2), "needs num_layers >= 2"),
        (dict(task="classify"), "needs at least 2 labels"),
        (dict(bidirectional=True), "cannot see the future"),
        (dict(tie_weights=True, embed_dim=8, hidden_size=16), "embed_dim == hidden_size"),
    ],
)
def test_invalid_configs_are_explained(kwargs, message) -> None:
    base = dict(task="next-token", cell="gru", vocab_size=10)
    base.update(kwargs)
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(**base)


def test_dict_round_trip_and_unknown_fields() -> None:
    cfg = ModelConfig(task="classify", cell="lstm", vocab_size=30, num_labels=4, num_layers=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelConfigError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "attention": True})


def test_streamable_only_without_future_context() -> None:
    assert ModelConfig(task="next-token", cell="gru", vocab_size=10).streamable
    bi = ModelConfig(task="seq2seq", cell="gru", vocab_size=10, bidirectional=True)
    assert not bi.streamable
