"""The training loop: BPTT or truncated BPTT, teacher forcing, clipping, early stopping.

``train()`` builds (or continues) a model, runs epochs, validates after each one, keeps the best
checkpoint in ``out_dir`` and logs every update's loss and per-layer gradient norms to
``out_dir/train_log.jsonl``. It is seeded and reproducible on CPU.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest, save_checkpoint
from stream_rnn.train.batching import TaskName, make_batches, prepare
from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import TrainError
from stream_rnn.train.objectives import EvalResult, evaluate, sequence_loss, tbptt_losses
from stream_rnn.train.schedules import LRSchedule, TeacherForcing, TFSchedule, get_lr
from stream_rnn.train.vocab import LabelSet, Level, Vocab


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint manifest as ``training``."""

    task: TaskName = "next-token"
    cell: Literal["rnn_tanh", "rnn_relu", "lstm", "gru"] = "gru"
    level: Level = "char"
    layers: int = 1
    hidden: int = 128
    embed: int = 64
    dropout: float = 0.0
    bidirectional: bool = False
    tie_weights: bool = False
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    clip: float = 1.0
    tbptt_k1: int | None = None
    tbptt_k2: int | None = None
    tf_schedule: TFSchedule = "constant"
    tf_ratio: float = 1.0
    tf_min_ratio: float = 0.0
    tf_decay_steps: int = 1000
    tf_sigmoid_k: float = 100.0
    patience: int = 3
    monitor: Literal["loss", "accuracy"] = "loss"
    seed: int = 0
    device: str = "cpu"
    max_len: int | None = None
    min_count: int = 1
    max_vocab: int | None = None
    max_minutes: float | None = None
    log_every: int = 20

    def teacher_forcing(self) -> TeacherForcing:
        return TeacherForcing(
            self.tf_schedule,
            self.tf_ratio,
            self.tf_min_ratio,
            self.tf_decay_steps,
            self.tf_sigmoid_k,
        )


class Callback(Protocol):
    """Hooks a caller plugs into the loop (progress display, tests)."""

    def on_step(self, step: int, epoch: int, loss: float, info: dict[str, Any]) -> None: ...

    def on_epoch(self, epoch: int, metrics: dict[str, Any], improved: bool) -> None: ...


@dataclass
class TrainResult:
    manifest: Manifest
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    elapsed_s: float = 0.0


_LAYER = re.compile(r"^(?P<mod>(?:encoder\.)?rnn)\.\w+_l(?P<layer>\d+)(?:_reverse)?$")


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per layer: ``embedding``, ``rnn.l0``, ``rnn.l1`` …, ``decoder``.

    Watching these per update shows vanishing (lower layers' norms collapse) or exploding
    gradients (norms spike before clipping).
    """
    sq: dict[str, float] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        match = _LAYER.match(name)
        group = f"{match['mod']}.l{match['layer']}" if match else name.rsplit(".", 1)[0]
        sq[group] = sq.get(group, 0.0) + float(param.grad.detach().float().pow(2).sum())
    return {k: v**0.5 for k, v in sq.items()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return torch.device(name)


def _optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise TrainError(f"optimizer {cfg.optimizer!r} is unknown; use adam, adamw or sgd")


def build_vocab(cfg: TrainConfig, records: Sequence[Record]) -> tuple[Vocab, LabelSet | None]:
    items: list[Any] = [r.items(cfg.level) for r in records]
    if cfg.task == "seq2seq":
        items += [r.target_items(cfg.level) for r in records if r.target is not None]
    vocab = Vocab.build(items, cfg.level, min_count=cfg.min_count, max_size=cfg.max_vocab)
    labels: LabelSet | None = None
    if cfg.task == "classify":
        labels = LabelSet.build(str(r.label) for r in records if r.label is not None)
    elif cfg.task == "tag":
        labels = LabelSet.build(str(t) for r in records for t in (r.tags or []))
    return vocab, labels


def train(
    cfg: TrainConfig,
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    out_dir: str | Path,
    *,
    init: tuple[RecurrentModel, Manifest] | None = None,
    vocab: Vocab | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a model and keep the best checkpoint (by validation ``cfg.monitor``) in ``out_dir``.

    ``init`` continues from a loaded checkpoint: its config, vocabulary and labels are kept and
    the new checkpoint records it as ``parent_version``. ``vocab`` fixes the vocabulary (token
    ids as given) instead of building one from the training data.

    Example::

        result = train(TrainConfig(task="classify", cell="gru", epochs=5), tr, va, "runs/lang")
        print(result.manifest.metrics["valid"]["accuracy"])
    """
    started = time.monotonic()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # noqa: S311 - shuffling batches, not secrets
    device = _device(cfg.device)
    if not train_records:
        raise TrainError("training data is empty; give --data a JSONL file with sequences")
    if not valid_records:
        raise TrainError("validation data is empty; give --valid a JSONL file with sequences")
    if cfg.tbptt_k1 is not None and cfg.task not in ("next-token", "tag"):
        raise TrainError(f"--tbptt applies to next-token and tag, not {cfg.task}")
    if init is not None:
        model, parent = init
        vocab = Vocab.from_dict(parent.vocab)
        labels = LabelSet.from_dict({"labels": parent.labels}) if parent.labels else None
        if model.config.task != cfg.task:
            raise TrainError(f"--init model is a {model.config.task!r} model, not {cfg.task!r}")
        parent_version: str | None = parent.version
    else:
        built, labels = build_vocab(cfg, train_records)
        if vocab is None:
            vocab = built
        elif vocab.level != cfg.level:
            raise TrainError(
                f"the given vocabulary splits text by {vocab.level!r} but --level is "
                f"{cfg.level!r}; pass --level {vocab.level}"
            )
        mcfg = ModelConfig(
            task=cfg.task,
            cell=cfg.cell,
            vocab_size=len(vocab),
            embed_dim=cfg.embed,
            hidden_size=cfg.hidden,
            num_layers=cfg.layers,
            dropout=cfg.dropout,
            bidirectional=cfg.bidirectional,
            tie_weights=cfg.tie_weights,
            num_labels=len(labels) if labels is not None else 0,
        )
        model = RecurrentModel(mcfg)
        parent_version = None
    model.to(device).train()
    train_ex = prepare(list(train_records), cfg.task, vocab, labels, max_len=cfg.max_len)
    valid_ex = prepare(list(valid_records), cfg.task, vocab, labels, max_len=cfg.max_len)
    valid_batches = make_batches(valid_ex, cfg.task, vocab, max(cfg.batch_size, 64))
    optimizer = _optimizer(cfg, model.parameters())
    tf = cfg.teacher_forcing()
    steps_per_epoch = max(1, -(-len(train_ex) // cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w", encoding="utf-8")
    best: tuple[float, int, Manifest] | None = None
    history: list[dict[str, Any]] = []
    step, bad_epochs, stopped = 0, 0, False
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            epoch_loss, epoch_n = 0.0, 0
            for cpu_batch in make_batches(train_ex, cfg.task, vocab, cfg.batch_size, rng=rng):
                batch = cpu_batch.to(device)
                ratio = tf.at(step)
                if cfg.tbptt_k1 is not None:
                    losses = tbptt_losses(
                        model, batch, cfg.tbptt_k1, cfg.tbptt_k2 or cfg.tbptt_k1, ratio, gen
                    )
                else:
                    losses = iter([sequence_loss(model, batch, ratio, gen)[0]])
                for loss in losses:
                    lr = get_lr(
                        step,
                        base_lr=cfg.lr,
                        total_steps=total_steps,
                        schedule=cfg.lr_schedule,
                        warmup_steps=cfg.warmup_steps,
                        min_lr=cfg.min_lr,
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    log_now = step % cfg.log_every == 0
                    norms = layer_grad_norms(model) if log_now else {}
                    total_norm = float(
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                        if cfg.clip > 0
                        else torch.tensor(0.0)
                    )
                    if not torch.isfinite(loss):
                        raise TrainError(
                            f"loss became {float(loss)} at step {step}; lower --lr or set --clip"
                        )
                    optimizer.step()
                    value = loss.item()
                    epoch_loss += value
                    epoch_n += 1
                    info: dict[str, Any] = {"lr": lr, "tf_ratio": ratio, "grad_norm": total_norm}
                    if log_now:
                        info["grad_norms"] = norms
                        rec = {"event": "step", "step": step, "epoch": epoch, "loss": value, **info}
                        log.write(json.dumps(rec) + "\n")
                    for cb in callbacks:
                        cb.on_step(step, epoch, value, info)
                    step += 1
            result: EvalResult = evaluate(
                model, valid_batches, device, bos_id=vocab.bos_id, eos_id=vocab.eos_id
            )
            metrics = {
                "epoch": epoch,
                "train_loss": epoch_loss / max(epoch_n, 1),
                "valid": result.as_dict(cfg.task),
                "elapsed_s": time.monotonic() - started,
            }
            history.append(metrics)
            log.write(json.dumps({"event": "epoch", **metrics}) + "\n")
            log.flush()
            score = result.loss if cfg.monitor == "loss" else -result.accuracy
            improved = best is None or score < best[0] - 1e-6
            if improved:
                manifest = save_checkpoint(
                    out,
                    model,
                    vocab=vocab.to_dict(),
                    labels=list(labels.labels) if labels is not None else None,
                    parent_version=parent_version,
                    training={**asdict(cfg), "best_epoch": epoch, "steps": step},
                    metrics={
                        "valid": result.as_dict(cfg.task),
                        "train_loss": metrics["train_loss"],
                    },
                )
                best = (score, epoch, manifest)
                bad_epochs = 0
            else:
                bad_epochs += 1
            for cb in callbacks:
                cb.on_epoch(epoch, metrics, improved)
            if bad_epochs >= cfg.patience:
                stopped = True
                break
            if cfg.max_minutes is not None and time.monotonic() - started > cfg.max_minutes * 60:
                stopped = True
                break
    finally:
        log.close()
    if best is None:  # only reachable with epochs < 1
        raise TrainError(f"no epoch ran (epochs={cfg.epochs}); use --epochs 1 or more")
    return TrainResult(best[2], best[1], history, stopped, time.monotonic() - started)
