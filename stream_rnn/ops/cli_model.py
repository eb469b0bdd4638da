"""CLI commands around models: train, score, generate, grad-report, info."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from stream_rnn.model.config import CELLS
from stream_rnn.ops.cli_options import data_option, device_option, model_option
from stream_rnn.ops.settings import get_settings

console = Console(stderr=True, soft_wrap=True)

TASK_CHOICE = click.Choice(["next-token", "classify", "tag", "seq2seq"])
CELL_CHOICE = click.Choice(list(CELLS))


@click.command("train")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="training JSONL (sequences or event log)",
)
@click.option(
    "--valid",
    "valid",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="validation JSONL",
)
@click.option("--task", type=TASK_CHOICE, default="next-token", show_default=True)
@click.option("--cell", type=CELL_CHOICE, default="gru", show_default=True)
@click.option(
    "--level",
    type=click.Choice(["char", "word", "token"]),
    default="char",
    show_default=True,
    help="how text is split into tokens",
)
@click.option("--layers", type=int, default=1, show_default=True)
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--embed", type=int, default=64, show_default=True)
@click.option("--dropout", type=float, default=0.0, show_default=True, help="inter-layer dropout")
@click.option(
    "--bidirectional", is_flag=True, help="bidirectional encoder (offline only: cannot be streamed)"
)
@click.option(
    "--tie-weights", is_flag=True, help="share embedding and decoder weights (embed == hidden)"
)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option(
    "--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", show_default=True
)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine", "linear"]),
    default="constant",
    show_default=True,
)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option(
    "--clip", type=float, default=1.0, show_default=True, help="gradient-norm clipping (0 = off)"
)
@click.option(
    "--tbptt",
    nargs=2,
    type=int,
    default=None,
    metavar="K1 K2",
    help="truncated BPTT: update every K1 tokens, backprop over K2",
)
@click.option(
    "--teacher-forcing",
    "tf_ratio",
    type=float,
    default=1.0,
    show_default=True,
    help="probability of feeding the true token",
)
@click.option(
    "--tf-schedule",
    type=click.Choice(["constant", "linear", "inverse-sigmoid"]),
    default="constant",
    show_default=True,
)
@click.option(
    "--tf-min", type=float, default=0.0, show_default=True, help="floor of a decaying schedule"
)
@click.option("--tf-decay-steps", type=int, default=1000, show_default=True)
@click.option("--tf-k", type=float, default=100.0, show_default=True, help="inverse-sigmoid k")
@click.option(
    "--patience",
    type=int,
    default=3,
    show_default=True,
    help="early stopping: epochs without improvement",
)
@click.option(
    "--monitor", type=click.Choice(["loss", "accuracy"]), default="loss", show_default=True
)
@click.option("--max-len", type=int, default=None, help="truncate sequences to this many tokens")
@click.option("--max-vocab", type=int, default=None, help="keep only the most frequent tokens")
@click.option(
    "--max-minutes",
    type=float,
    default=None,
    help="stop after the epoch that passes this time budget",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--vocab",
    "vocab_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="given vocabulary: JSON list of tokens, a saved vocab object, or one token per line",
)
@click.option(
    "--init",
    "init_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="continue training a checkpoint",
)
@click.option(
    "--grad-report",
    "grad_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="write dL/dh(t) table and plot here",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="checkpoint directory (best epoch kept)",
)
@device_option
def train_cmd(**kw: Any) -> None:
    """Train a model with BPTT (or truncated BPTT) and teacher forcing; keep the best checkpoint."""
    from stream_rnn.ops.progress import RichTrainProgress
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.data import read_records
    from stream_rnn.train.trainer import TrainConfig, train

    tbptt = kw.pop("tbptt")
    renamed = {"tf_min": "tf_min_ratio", "tf_k": "tf_sigmoid_k"}
    known = {f.name for f in fields(TrainConfig)}
    options = {renamed.get(k, k): v for k, v in kw.items() if renamed.get(k, k) in known}
    options["device"] = str(kw["device"] or get_settings().device)
    if tbptt:
        options["tbptt_k1"], options["tbptt_k2"] = tbptt
    cfg = TrainConfig(**options)
    train_records = read_records(str(kw["data"]))
    valid_records = read_records(str(kw["valid"]))
    init = load_checkpoint(str(kw["init_dir"])) if kw["init_dir"] else None
    vocab = None
    if kw["vocab_file"]:
        from stream_rnn.train.vocab import Vocab

        vocab = Vocab.from_file(str(kw["vocab_file"]), cfg.level)
    console.print(
        f"training {cfg.task} {cfg.cell} {cfg.layers}x{cfg.hidden} on {len(train_records)} "
        f"sequences (valid {len(valid_records)}), device {cfg.device}"
    )
    steps = max(1, -(-len(train_records) // cfg.batch_size))
    progress = RichTrainProgress(console, cfg.epochs, steps)
    try:
        result = train(
            cfg,
            train_records,
            valid_records,
            str(kw["out_dir"]),
            init=init,
            vocab=vocab,
            callbacks=[progress],
        )
    finally:
        progress.close()
    valid = result.manifest.metrics["valid"]
    console.print(
        f"best epoch {result.best_epoch}: "
        + "  ".join(f"{k} {v:.4f}" for k, v in valid.items())
        + f"  -> {kw['out_dir']} (version {result.manifest.version}, {result.elapsed_s:.0f}s)"
    )
    if kw["grad_dir"]:
        from stream_rnn.train.gradients import model_gradient_report

        paths = model_gradient_report(str(kw["out_dir"]), valid_records, str(kw["grad_dir"]))
        console.print("gradient report: " + ", ".join(str(p) for p in paths))


@click.command("score")
@model_option
@data_option
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="output JSONL, one line per sequence",
)
@click.option(
    "--top-k", type=int, default=5, show_default=True, help="next-token candidates per position"
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@device_option
def score_cmd(
    model_dir: str, data: str, out_path: str, top_k: int, batch_size: int, device: str | None
) -> None:
    """Score recorded sequences offline with full-sequence passes (one JSON line per sequence)."""
    from stream_rnn.predict.offline import score_records
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.data import read_records

    model, manifest = load_checkpoint(model_dir, device=device or get_settings().device)
    records = read_records(data)
    n = 0
    with Path(out_path).open("w", encoding="utf-8") as fh:
        for line in score_records(model, manifest, records, batch_size=batch_size, top_k=top_k):
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    console.print(f"scored {n} sequences with {manifest.version} -> {out_path}")


@click.command("generate")
@model_option
@click.option("--prompt", default="", help="text (split like the training data) to continue")
@click.option("-n", "--n", "n", type=int, default=80, show_default=True, help="tokens to generate")
@click.option("--greedy", is_flag=True, help="argmax instead of sampling")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option(
    "--top-k",
    type=int,
    default=0,
    show_default=True,
    help="sample from the k most likely (0 = all)",
)
@click.option("--seed", type=int, default=None, help="make sampling reproducible")
@device_option
def generate_cmd(
    model_dir: str,
    prompt: str,
    n: int,
    greedy: bool,
    temperature: float,
    top_k: int,
    seed: int | None,
    device: str | None,
) -> None:
    """Continue a prompt with a next-token model (greedy, temperature, top-k; seeded)."""
    from stream_rnn.model.generate import generate
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.vocab import Vocab

    model, manifest = load_checkpoint(model_dir, device=device or get_settings().device)
    vocab = Vocab.from_dict(manifest.vocab)
    ids = generate(
        model,
        vocab.encode(prompt),
        n,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    click.echo(prompt + ("" if vocab.level == "char" else " ") + vocab.detok(ids))


@click.command("grad-report")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--cells",
    default="rnn_tanh,rnn_relu,lstm,gru",
    show_default=True,
    help="fresh models to compare",
)
@click.option("--length", type=int, default=100, show_default=True, help="sequence length T")
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=1, show_default=True)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="report for this trained checkpoint instead",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="sequences for --model",
)
@click.option("--seed", type=int, default=0, show_default=True)
def grad_report_cmd(
    out_dir: str,
    cells: str,
    length: int,
    hidden: int,
    layers: int,
    model_dir: str | None,
    data: str | None,
    seed: int,
) -> None:
    """Norm of dL_T/dh(t) at every step t: see gradients vanish or explode through time."""
    from stream_rnn.train.gradients import compare_cells, model_gradient_report, write_report

    if model_dir:
        if not data:
            raise click.UsageError("--model needs --data (sequences to backpropagate through)")
        from stream_rnn.train.data import read_records

        paths = model_gradient_report(model_dir, read_records(data), out_dir, length=length)
    else:
        names = [c.strip() for c in cells.split(",") if c.strip()]
        bad = [c for c in names if c not in CELLS]
        if bad:
            raise click.BadParameter(
                f"unknown cells {bad}; choose from {', '.join(CELLS)}", param_hint="--cells"
            )
        curves = compare_cells(names, length=length, hidden=hidden, layers=layers, seed=seed)
        paths = write_report(
            curves, out_dir, f"dL_T/dh(t), T={length}, hidden={hidden}, fresh init"
        )
        for c in curves:
            console.print(f"{c.name:>9}: {c.summary()}")
    console.print("wrote " + ", ".join(str(p) for p in paths))


@click.command("info")
@model_option
def info_cmd(model_dir: str) -> None:
    """Verify a checkpoint and print its manifest (version, config, metrics)."""
    from stream_rnn.registry.checkpoint import load_checkpoint

    model, manifest = load_checkpoint(model_dir)
    data = manifest.to_dict()
    data["vocab"] = {
        "level": manifest.vocab.get("level"),
        "size": len(manifest.vocab.get("itos", [])),
    }
    data["parameters"] = sum(p.numel() for p in model.parameters())
    click.echo(json.dumps(data, indent=2))
