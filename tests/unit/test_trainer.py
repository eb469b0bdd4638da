"""The trainer: BPTT and truncated BPTT, teacher forcing, early stopping, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry import load_checkpoint
from stream_rnn.train.batching import make_batches, prepare
from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import TrainError
from stream_rnn.train.objectives import sequence_loss, tbptt_losses
from stream_rnn.train.schedules import TeacherForcing, get_lr
from stream_rnn.train.synthetic import generate_split
from stream_rnn.train.trainer import TrainConfig, train
from stream_rnn.train.vocab import Vocab


def _distinct_batch(length: int):
    """One sequence whose tokens are all distinct, so embedding-gradient rows name positions."""
    vocab = Vocab.from_tokens([f"t{i}" for i in range(length)], "token")
    rec = Record(key="k", tokens=[f"t{i}" for i in range(length)])
    ex = prepare([rec], "next-token", vocab)
    return vocab, make_batches(ex, "next-token", vocab, 1)[0]


def _model(vocab_size: int, cell: str = "rnn_tanh") -> RecurrentModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        task="next-token", cell=cell, vocab_size=vocab_size, embed_dim=4, hidden_size=6
    )
    return RecurrentModel(cfg)


def test_tbptt_with_one_window_is_full_bptt() -> None:
    vocab, batch = _distinct_batch(12)
    model = _model(len(vocab))
    full, _ = sequence_loss(model, batch)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (only,) = list(tbptt_losses(model, batch, k1=12, k2=12))
    only.backward()
    assert torch.allclose(only, full, atol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


@pytest.mark.parametrize(("k1", "k2", "reach"), [(4, 4, 4), (4, 8, 8), (2, 6, 6)])
def test_tbptt_backpropagates_exactly_k2_steps(k1: int, k2: int, reach: int) -> None:
    length = 12
    vocab, batch = _distinct_batch(length)
    model = _model(len(vocab))
    losses = list(tbptt_losses(model, batch, k1=k1, k2=k2))
    assert len(losses) == length // k1
    last = losses[-1]  # the update for the final chunk, positions [12 - k1, 12)
    model.zero_grad()
    last.backward()
    grad = model.embedding.weight.grad
    touched = {i for i in range(length) if grad[vocab.id_of(f"t{i}")].abs().sum() > 0}
    assert touched == set(range(length - reach, length))


def test_tbptt_carries_state_across_chunks() -> None:
    """Each update's loss equals the full pass's loss over the same positions."""
    vocab, batch = _distinct_batch(12)
    model = _model(len(vocab), "gru")
    with torch.no_grad():
        logits, _ = model(batch.src)
        per_token = torch.nn.functional.cross_entropy(logits[0], batch.targets[0], reduction="none")
        losses = [float(x) for x in tbptt_losses(model, batch, k1=3, k2=3)]
    expected = [float(per_token[i : i + 3].mean()) for i in range(0, 12, 3)]
    assert losses == pytest.approx(expected, abs=1e-5)


def test_tbptt_arguments_are_checked() -> None:
    vocab, batch = _distinct_batch(6)
    with pytest.raises(TrainError, match="k2 a multiple of k1"):
        list(tbptt_losses(_model(len(vocab)), batch, k1=4, k2=6))


def test_teacher_forcing_schedules() -> None:
    assert TeacherForcing("constant", 0.7).at(10_000) == 0.7
    lin = TeacherForcing("linear", 1.0, 0.2, decay_steps=100)
    assert [lin.at(s) for s in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    inv = TeacherForcing("inverse-sigmoid", 1.0, 0.0, sigmoid_k=10)
    values = [inv.at(s) for s in range(0, 200, 10)]
    assert values == sorted(values, reverse=True) and values[0] > 0.9 and values[-1] < 0.01
    with pytest.raises(TrainError, match="min_ratio <= ratio"):
        TeacherForcing("linear", 0.3, 0.5)


def test_learning_rate_schedules() -> None:
    assert get_lr(0, base_lr=1.0, total_steps=10, warmup_steps=4) == 0.25
    assert get_lr(10, base_lr=1.0, total_steps=10, schedule="cosine") == pytest.approx(0.0)
    assert get_lr(5, base_lr=1.0, total_steps=10, schedule="linear") == pytest.approx(0.5)


def test_scheduled_sampling_feeds_model_samples() -> None:
    vocab, batch = _distinct_batch(10)
    model = _model(len(vocab))
    gen = torch.Generator().manual_seed(0)
    forced, _ = sequence_loss(model, batch, 1.0)
    free, _ = sequence_loss(model, batch, 0.0, gen)
    half, _ = sequence_loss(model, batch, 0.999999, gen)
    assert not torch.isclose(forced, free)
    assert torch.isclose(forced, half, atol=1e-6)  # coin flips below 1 almost always pass


@pytest.fixture(scope="module")
def classify_split():
    return generate_split("classify", 600, 150, 10, seed=3)


def test_training_learns_and_keeps_the_best_epoch(classify_split, tmp_path: Path) -> None:
    cfg = TrainConfig(
        task="classify", cell="gru", hidden=48, embed=16, epochs=6, lr=5e-3, seed=1, patience=10
    )
    result = train(cfg, classify_split.train, classify_split.valid, tmp_path)
    losses = [h["valid"]["loss"] for h in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    # 4 balanced classes: chance is 0.25; a few epochs on 600 sequences must be far above it
    assert result.manifest.metrics["valid"]["accuracy"] > 0.5
    model, manifest = load_checkpoint(tmp_path)
    assert manifest.training["best_epoch"] == result.best_epoch
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in log if x["event"] == "step"]
    assert {"embedding", "rnn.l0", "decoder"} <= set(steps[0]["grad_norms"])
    assert sum(x["event"] == "epoch" for x in log) == len(result.history)


def test_training_is_reproducible(classify_split, tmp_path: Path) -> None:
    cfg = TrainConfig(task="classify", cell="lstm", hidden=16, embed=8, epochs=1, seed=7)
    a = train(cfg, classify_split.train[:200], classify_split.valid, tmp_path / "a")
    b = train(cfg, classify_split.train[:200], classify_split.valid, tmp_path / "b")
    c = train(
        TrainConfig(**{**cfg.__dict__, "seed": 8}),
        classify_split.train[:200],
        classify_split.valid,
        tmp_path / "c",
    )
    assert a.manifest.weights_sha256 == b.manifest.weights_sha256
    assert a.manifest.weights_sha256 != c.manifest.weights_sha256


def test_early_stopping(classify_split, tmp_path: Path) -> None:
    cfg = TrainConfig(task="classify", cell="gru", hidden=8, embed=4, epochs=10, lr=0.0, patience=2)
    result = train(cfg, classify_split.train[:100], classify_split.valid, tmp_path)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        (
            "next-token",
            dict(
                tbptt_k1=8,
                tbptt_k2=16,
                tf_schedule="linear",
                tf_ratio=1.0,
                tf_min_ratio=0.5,
                tf_decay_steps=20,
                layers=2,
                dropout=0.1,
            ),
        ),
        ("tag", dict(cell="lstm")),
        ("seq2seq", dict(tf_schedule="inverse-sigmoid", tf_sigmoid_k=20, bidirectional=True)),
        # the dialects differ only in bigram statistics: classify needs more sequences
        ("classify", dict(cell="gru", bidirectional=True, n_train=1200)),
    ],
)
def test_every_task_trains_and_improves(task: str, extra: dict, tmp_path: Path) -> None:
    extra = dict(extra)
    n_train = extra.pop("n_train", 300)
    split = generate_split(task, n_train, 60, 0, seed=0)
    cfg = TrainConfig(
        **{
            **dict(task=task, cell="gru", hidden=32, embed=16, epochs=3, lr=5e-3, patience=5),
            **extra,
        }
    )
    result = train(cfg, split.train, split.valid, tmp_path)
    first, best = (
        result.history[0]["valid"]["loss"],
        min(h["valid"]["loss"] for h in result.history),
    )
    assert best < first or result.history[0]["valid"]["accuracy"] > 0.9
    if task == "seq2seq":
        assert "exact_match" in result.manifest.metrics["valid"]


def test_clear_errors_for_bad_runs(classify_split, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="training data is empty"):
        train(TrainConfig(task="classify"), [], classify_split.valid, tmp_path)
    with pytest.raises(TrainError, match="--tbptt applies to next-token and tag"):
        train(
            TrainConfig(task="classify", tbptt_k1=4),
            classify_split.train,
            classify_split.valid,
            tmp_path,
        )
    with pytest.raises(TrainError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise TrainError("CUDA is not available (skipping: this machine has CUDA)")
        train(
            TrainConfig(task="classify", device="cuda"),
            classify_split.train,
            classify_split.valid,
            tmp_path,
        )


def test_a_given_vocabulary_keeps_its_ids(classify_split, tmp_path: Path) -> None:
    letters = sorted({ch for r in classify_split.train for ch in r.items("char")}, reverse=True)
    given = Vocab.from_tokens(letters, "char")
    cfg = TrainConfig(task="classify", cell="gru", hidden=8, embed=4, epochs=1)
    result = train(cfg, classify_split.train[:50], classify_split.valid[:20], tmp_path, vocab=given)
    assert result.manifest.vocab == given.to_dict()
    with pytest.raises(TrainError, match="pass --level token"):
        train(
            cfg,
            classify_split.train[:50],
            classify_split.valid[:20],
            tmp_path,
            vocab=Vocab.from_tokens(letters, "token"),
        )
