"""Real-data benchmark on ../shared/data/fortunes-langid (fortune texts in 7 languages).

1. Language identification, many-to-one, read character by character: trains with the
   ``stream-rnn train`` CLI under a 10-minute budget and reports validation accuracy.
2. Character-level next-token model on the English rows: validation perplexity next to the
   add-one unigram baseline computed on exactly the same targets.

Run: ``.venv/bin/python simulations/fortunes_benchmark.py [--data DIR] [--out DIR]``.
Prints a table and writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from stream_rnn.registry.checkpoint import read_manifest
from stream_rnn.train.baselines import unigram_perplexity
from stream_rnn.train.batching import prepare
from stream_rnn.train.data import read_records, write_records
from stream_rnn.train.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fortunes-langid"


def _train(args: list[str]) -> float:
    started = time.monotonic()
    cmd = [sys.executable, "-m", "stream_rnn", "train", *args]
    print("$ stream-rnn train " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, timeout=1200)  # noqa: S603 - our own CLI, fixed args
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fortunes")
    parser.add_argument("--minutes", type=float, default=9.0, help="langid training budget")
    parser.add_argument("--skip-langid", action="store_true")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float | str]] = {}

    if not args.skip_langid:
        seconds = _train(
            [
                "--data",
                str(args.data / "train.jsonl"),
                "--valid",
                str(args.data / "valid.jsonl"),
                "--task",
                "classify",
                "--cell",
                "gru",
                "--hidden",
                "128",
                "--embed",
                "64",
                "--epochs",
                "20",
                "--batch-size",
                "32",
                "--lr",
                "3e-3",
                "--monitor",
                "accuracy",
                "--patience",
                "3",
                "--max-minutes",
                str(args.minutes),
                "--out",
                str(out / "langid"),
            ]
        )
        manifest = read_manifest(out / "langid")
        results["langid"] = {
            "model": "gru 1x128, embed 64",
            "valid_accuracy": manifest.metrics["valid"]["accuracy"],
            "best_epoch": manifest.training["best_epoch"],
            "wall_s": round(seconds, 1),
        }

    # English rows only, for the character-level language model.
    for split in ("train", "valid"):
        # a next-token corpus carries no sequence labels
        rows = [
            replace(r, label=None)
            for r in read_records(args.data / f"{split}.jsonl")
            if r.label == "en"
        ]
        write_records(out / f"en_{split}.jsonl", rows)
    seconds = _train(
        [
            "--data",
            str(out / "en_train.jsonl"),
            "--valid",
            str(out / "en_valid.jsonl"),
            "--task",
            "next-token",
            "--cell",
            "lstm",
            "--layers",
            "2",
            "--hidden",
            "192",
            "--embed",
            "48",
            "--dropout",
            "0.1",
            "--epochs",
            "30",
            "--batch-size",
            "32",
            "--lr",
            "3e-3",
            "--patience",
            "3",
            "--max-minutes",
            "8",
            "--out",
            str(out / "charlm"),
        ]
    )
    manifest = read_manifest(out / "charlm")
    vocab = Vocab.from_dict(manifest.vocab)
    train_ex = prepare(read_records(out / "en_train.jsonl"), "next-token", vocab)
    valid_ex = prepare(read_records(out / "en_valid.jsonl"), "next-token", vocab)
    unigram = unigram_perplexity(train_ex, valid_ex, len(vocab))
    ppl = manifest.metrics["valid"]["perplexity"]
    results["charlm_en"] = {
        "model": "lstm 2x192, embed 48",
        "valid_perplexity": ppl,
        "unigram_perplexity": unigram,
        "ratio": unigram / ppl,
        "best_epoch": manifest.training["best_epoch"],
        "wall_s": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'benchmark':<12} {'metric':<28} {'value':>10}  {'reference':<26} {'wall':>7}")
    if "langid" in results:
        r = results["langid"]
        print(
            f"{'langid':<12} {'valid accuracy':<28} {r['valid_accuracy']:>10.4f}  {'target >= 0.93':<26} {r['wall_s']:>6.0f}s"
        )
    r = results["charlm_en"]
    print(
        f"{'char LM en':<12} {'valid perplexity':<28} {r['valid_perplexity']:>10.3f}  {'unigram ' + format(r['unigram_perplexity'], '.3f'):<26} {r['wall_s']:>6.0f}s"
    )


if __name__ == "__main__":
    main()
