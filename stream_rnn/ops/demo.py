"""``stream-rnn demo``: the main job end to end on a local default, with no downloads.

Generates the built-in synthetic corpora, trains a sequence classifier and a character-level
next-token model, scores the held-out sequences offline and prints what came out.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

console = Console()


def _unigram(manifest: object, train: list, valid: list) -> float:  # lists of Record
    from stream_rnn.train.baselines import unigram_perplexity
    from stream_rnn.train.batching import prepare
    from stream_rnn.train.vocab import Vocab

    vocab = Vocab.from_dict(manifest.vocab)  # type: ignore[attr-defined]
    tr, va = prepare(train, "next-token", vocab), prepare(valid, "next-token", vocab)
    return unigram_perplexity(tr, va, len(vocab))


def _train_and_score(
    task: str,
    cell: str,
    hidden: int,
    sizes: tuple[int, int, int],
    out: Path,
    epochs: int,
    seed: int,
    step: str,
) -> tuple[Any, Path, Any, Any, Any, list[dict[str, Any]]]:
    """Synthetic corpus -> train -> score the test split; everything written under ``out``."""
    from stream_rnn.predict.offline import score_records
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.data import write_records
    from stream_rnn.train.synthetic import generate_split
    from stream_rnn.train.trainer import TrainConfig, train

    split = generate_split(task, *sizes, seed=seed)  # type: ignore[arg-type]
    data = out / task
    data.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        write_records(data / f"{name}.jsonl", recs)
    console.print(f"{step} {task}: {len(split.train)} synthetic sequences in {data}")
    cfg = TrainConfig(
        task=task,  # type: ignore[arg-type]
        cell=cell,  # type: ignore[arg-type]
        hidden=hidden,
        embed=32,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        seed=seed,
        patience=3,
    )
    result = train(cfg, split.train, split.valid, data / "model")
    model, manifest = load_checkpoint(data / "model")
    lines = list(score_records(model, manifest, split.test))
    with (data / "test_scores.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return split, data, result, model, manifest, lines


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="artefact directory (default: runs/demo)",
)
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--stream/--no-stream", default=True, show_default=True, help="also run the Kafka stage"
)
def demo_cmd(out_dir: str | None, epochs: int, seed: int, stream: bool) -> None:
    """Run the main job end to end: synthetic data -> train -> score -> stream through Kafka."""
    from stream_rnn.ops.settings import get_settings

    out = Path(out_dir) if out_dir else get_settings().runs_dir / "demo"
    started = time.monotonic()
    summary = Table(title="stream_rnn demo: held-out results")
    for col in ("task", "model", "metric", "value", "reference"):
        summary.add_column(col)

    # 1. sequence classification (many-to-one)
    step = "[bold]1/3[/bold]"
    split, data, result, model, manifest, lines = _train_and_score(
        "classify", "gru", 64, (1600, 200, 200), out, epochs, seed, step
    )
    acc = sum(line["label"] == r.label for line, r in zip(lines, split.test, strict=True)) / len(
        lines
    )
    majority = Counter(r.label for r in split.test).most_common(1)[0][1] / len(split.test)
    summary.add_row(
        "classify",
        f"gru 1x64 ({manifest.version})",
        "test accuracy",
        f"{acc:.3f}",
        f"majority class {majority:.3f}",
    )
    console.print(f"   trained in {result.elapsed_s:.0f}s; scores -> {data / 'test_scores.jsonl'}")
    classify_model, classify_test, classify_offline = data / "model", split.test, lines
    for line in lines[:3]:
        console.print(f"   {line['key']}: {line['label']} (p={line['probs'][line['label']]:.3f})")

    # 2. character-level next-token prediction (many-to-many aligned) and generation
    step = "[bold]2/3[/bold]"
    split, data, result, model, manifest, lines = _train_and_score(
        "next-token", "lstm", 96, (1200, 150, 150), out, epochs, seed, step
    )
    ppl = manifest.metrics["valid"]["perplexity"]
    summary.add_row(
        "next-token",
        f"lstm 1x96 ({manifest.version})",
        "valid perplexity",
        f"{ppl:.2f}",
        f"unigram {_unigram(manifest, split.train, split.valid):.2f}",
    )
    from stream_rnn.model.generate import generate
    from stream_rnn.train.vocab import Vocab

    vocab = Vocab.from_dict(manifest.vocab)
    prompt = split.test[0].items("char")[:12]
    sample = vocab.detok(generate(model, vocab.encode(prompt), 60, temperature=0.7, seed=seed))
    console.print(
        f"   trained in {result.elapsed_s:.0f}s; sample: [italic]{''.join(map(str, prompt))}[/italic]{sample}"
    )
    # 3. the same classifier behind a real Kafka broker and a stream worker
    if stream:
        from stream_rnn.ops.demo_stream import stream_through_kafka

        console.print("[bold]3/3[/bold] streaming the classify test set through Kafka")
        figures = stream_through_kafka(
            console, classify_model, classify_test, classify_offline, out / "stream", seed=seed
        )
        summary.add_row(
            "classify, streamed",
            "1 worker, Kafka",
            "labels equal to offline",
            f"{figures['same_label']}/{figures['sequences']}",
            f"max |p - p_offline| {figures['max_prob_diff']:.1e}",
        )
        summary.add_row(
            "",
            "",
            "latency p50 / p99",
            f"{figures['latency_p50_s'] * 1000:.0f} / {figures['latency_p99_s'] * 1000:.0f} ms",
            f"{figures['seconds']:.1f}s for {figures['sequences']} sequences",
        )
    console.print(summary)
    console.print(f"done in {time.monotonic() - started:.0f}s; artefacts in {out}")
