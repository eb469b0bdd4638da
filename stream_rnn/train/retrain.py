"""Retraining against the production model: a time-ordered holdout, a candidate, a verdict.

The Kafka-free half of ``stream-rnn retrain`` (the registry, the tokens topic and the
announcement live in `stream_rnn.ops.retrain`):

* `split_records` holds out the most recent part of the data (records come in time order)
  and samples, from the rest, the rows the trainer validates on to pick its best epoch, so
  that the held-out rows are seen neither in training nor in that choice;
* `train_candidate` trains with the production model's architecture, vocabulary and labels,
  from its weights (or fresh ones), with the ordinary `train` loop;
* `evaluate_records` scores a model on the held-out rows with the trainer's own `evaluate`,
  and `compare` decides whether the candidate beats production by the margin.

Example::

    split = split_records(records, holdout=0.2)
    result = train_candidate(production_dir, split, TrainConfig(epochs=5), "runs/candidate")
    cand = evaluate_records(*load_checkpoint("runs/candidate"), split.holdout)
    prod = evaluate_records(*load_checkpoint(production_dir), split.holdout)
    verdict = compare("next-token", cand, prod, margin=0.01)
    print(verdict.describe(), verdict.better)
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest, load_checkpoint
from stream_rnn.train.batching import make_batches, prepare
from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import RetrainError
from stream_rnn.train.objectives import EvalResult, evaluate
from stream_rnn.train.trainer import Callback, TrainConfig, TrainResult, _device, train
from stream_rnn.train.vocab import LabelSet, Vocab

# The metric each task is judged by, and whether higher is better.
PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "next-token": ("loss", False),
    "tag": ("loss", False),
    "seq2seq": ("loss", False),
    "classify": ("accuracy", True),
}
_EPS = 1e-9  # 10 * 0.2 is 2.0000000000000004 in floats: do not let that round up


@dataclass(frozen=True)
class Split:
    """The rows of one retraining run: ``train`` and ``valid`` for the trainer, and the most
    recent ``holdout`` rows on which candidate and production are compared."""

    train: list[Record]
    valid: list[Record]
    holdout: list[Record]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "holdout": len(self.holdout)}


def split_records(
    records: Sequence[Record], holdout: float = 0.2, *, valid: float = 0.1, seed: int = 0
) -> Split:
    """Hold out the last ``ceil(holdout * n)`` records; validate on a seeded sample of the rest.

    ``records`` must be in time order (the recorder returns them so; a file in its order).
    Raises `RetrainError` when a part would be empty.

    >>> s = split_records([Record(f"k{i}", tokens=["a"]) for i in range(10)], 0.2)
    >>> [r.key for r in s.holdout], len(s.train), len(s.valid)
    (['k8', 'k9'], 7, 1)
    """
    for name, value in (("--holdout", holdout), ("--valid-fraction", valid)):
        if not 0.0 < value < 1.0:
            raise RetrainError(f"{name} {value} must be a fraction between 0 and 1, like 0.2")
    n = len(records)
    n_hold = math.ceil(n * holdout - _EPS)
    rest = list(records[: n - n_hold])
    n_valid = math.ceil(len(rest) * valid - _EPS)
    if n_hold < 1 or n_valid < 1 or len(rest) - n_valid < 1:
        raise RetrainError(
            f"{n} sequences are too few to hold out {holdout:g} of them, validate on "
            f"{valid:g} of the rest and still train on some (that needs at least 3): widen "
            "the window (--last) or give more data"
        )
    picked = set(random.Random(seed).sample(range(len(rest)), n_valid))  # noqa: S311 - a sample
    return Split(
        train=[r for i, r in enumerate(rest) if i not in picked],
        valid=[r for i, r in enumerate(rest) if i in picked],
        holdout=list(records[n - n_hold :]),
    )


def known_labels(records: Sequence[Record], manifest: Manifest) -> tuple[list[Record], int]:
    """The records whose label (classify) or tags (tag) the production model has an output
    for, and how many others were left out (retraining does not change the label set)."""
    task = manifest.model_config.get("task")
    if task not in ("classify", "tag"):
        return list(records), 0
    labels = set(manifest.labels or ())
    if task == "classify":
        kept = [r for r in records if r.label is not None and r.label in labels]
    else:
        kept = [r for r in records if r.tags is not None and set(r.tags) <= labels]
    return kept, len(records) - len(kept)


def retrain_config(base: TrainConfig, manifest: Manifest) -> TrainConfig:
    """``base`` with every architecture field set from the production ``manifest``, so that
    the candidate's recorded training config describes the network it really is."""
    cfg = ModelConfig.from_dict(manifest.model_config)
    level = manifest.vocab.get("level", base.level)
    return dataclasses.replace(
        base,
        task=cfg.task,
        cell=cfg.cell,
        level=level,
        layers=cfg.num_layers,
        hidden=cfg.hidden_size,
        embed=cfg.embed_dim,
        dropout=cfg.dropout,
        bidirectional=cfg.bidirectional,
        tie_weights=cfg.tie_weights,
    )


def train_candidate(
    production_dir: str | Path,
    split: Split,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    from_scratch: bool = False,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a candidate into ``out_dir`` from the production checkpoint at ``production_dir``.

    The candidate keeps production's architecture, vocabulary (unknown tokens map to
    ``<unk>``) and labels; it starts from production's weights, or from a fresh seeded
    initialisation with ``from_scratch``. Its manifest names production as its parent.
    """
    model, manifest = load_checkpoint(production_dir, device=_device(cfg.device))
    cfg = retrain_config(cfg, manifest)
    if from_scratch:
        torch.manual_seed(cfg.seed)
        model = RecurrentModel(model.config)
    return train(
        cfg, split.train, split.valid, out_dir, init=(model, manifest), callbacks=callbacks
    )


def evaluate_records(
    model: RecurrentModel,
    manifest: Manifest,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    max_len: int | None = None,
) -> EvalResult:
    """``model``'s loss and accuracy (and perplexity) on ``records``, as the trainer validates."""
    vocab = Vocab.from_dict(manifest.vocab)
    labels = LabelSet.from_dict({"labels": manifest.labels}) if manifest.labels else None
    task = model.config.task
    examples = prepare(list(records), task, vocab, labels, max_len=max_len)
    batches = make_batches(examples, task, vocab, batch_size)
    device = next(model.parameters()).device
    return evaluate(model, batches, device, bos_id=vocab.bos_id, eos_id=vocab.eos_id)


def relative_improvement(candidate: float, production: float, higher_is_better: bool) -> float:
    """How much better ``candidate`` is, relative to ``production`` (0.1 = 10 % better).

    Against a production value of 0 any gain is infinite, a tie is 0 and a loss is -inf;
    a NaN on either side gives NaN (never better).

    >>> relative_improvement(0.9, 1.0, False), relative_improvement(0.6, 0.5, True)
    (0.09999999999999998, 0.19999999999999996)
    """
    gain = candidate - production if higher_is_better else production - candidate
    if math.isnan(gain):
        return math.nan
    if production == 0:
        return 0.0 if gain == 0 else math.copysign(math.inf, gain)
    return gain / abs(production)


@dataclass(frozen=True)
class Comparison:
    """Candidate against production on the same held-out rows, by the task's primary metric.

    ``better`` is the verdict: the relative improvement exceeds ``margin`` (so a margin of 0
    asks for strictly better).
    """

    metric: str
    higher_is_better: bool
    candidate: float
    production: float
    improvement: float
    margin: float

    @property
    def better(self) -> bool:
        return self.improvement > self.margin

    def describe(self) -> str:
        change = "n/a" if not math.isfinite(self.improvement) else f"{self.improvement:+.2%}"
        return (
            f"{self.metric} {self.candidate:.4f} vs production {self.production:.4f} "
            f"({change} better, margin {self.margin:.2%})"
        )


def compare(task: str, candidate: EvalResult, production: EvalResult, margin: float) -> Comparison:
    """Judge ``candidate`` against ``production`` by the primary metric of ``task``."""
    if margin < 0 or math.isnan(margin):
        raise RetrainError(f"--margin {margin} must be 0 or more (0.01 = 1 % better)")
    metric, higher = PRIMARY_METRIC[task]
    cand = getattr(candidate, metric)
    prod = getattr(production, metric)
    return Comparison(metric, higher, cand, prod, relative_improvement(cand, prod, higher), margin)
