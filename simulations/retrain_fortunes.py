"""Real-learning check of ``stream-rnn retrain`` on fortunes-langid (language of a fortune).

v1 is a deliberately under-trained classifier (few sequences, one epoch), published as
production in a fresh registry; ``stream-rnn retrain --data`` then trains on more recorded
sequences from v1's weights. Both are scored on the separate valid set.

    .venv/bin/python simulations/retrain_fortunes.py [--data-dir ../shared/data/fortunes-langid]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=REPO.parent / "shared/data/fortunes-langid"
    )
    parser.add_argument("--v1-records", type=int, default=300)
    parser.add_argument("--records", type=int, default=8000, help="recorded sequences for v2")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import torch

    from stream_rnn.registry import Registry, load_checkpoint
    from stream_rnn.train.data import read_records, write_records
    from stream_rnn.train.retrain import evaluate_records
    from stream_rnn.train.trainer import TrainConfig, build_vocab, train

    torch.set_num_threads(2)
    train_all = read_records(args.data_dir / "train.jsonl")
    valid = read_records(args.data_dir / "valid.jsonl")
    work = Path(tempfile.mkdtemp(prefix="retrain-fortunes-"))
    cfg = TrainConfig(
        task="classify", cell="gru", hidden=64, embed=32, epochs=1, batch_size=32, max_len=200
    )
    # v1 knows every character of the training set: the check measures learning, not <unk>s
    vocab, _ = build_vocab(cfg, train_all)
    started = time.monotonic()
    v1 = train(cfg, train_all[: args.v1_records], valid[:200], work / "v1", vocab=vocab)
    registry = Registry(work / "registry")
    registry.add(work / "v1")
    registry.promote(v1.manifest.version)
    print(f"v1 {v1.manifest.version}: {args.v1_records} sequences, 1 epoch")

    recorded = work / "recorded.jsonl"
    write_records(recorded, train_all[: args.records])
    cmd = [
        sys.executable, "-m", "stream_rnn", "retrain", "--registry", str(work / "registry"),
        "--data", str(recorded), "--epochs", str(args.epochs), "--batch-size", "64",
        "--max-len", "200", "--no-announce",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True)  # noqa: S603 - our own module
    entry = json.loads((work / "registry/retrain.jsonl").read_text().splitlines()[-1])

    for name, version in (("v1", v1.manifest.version), ("v2", registry.production())):
        assert version is not None
        model, manifest = load_checkpoint(registry.path(version))
        result = evaluate_records(model, manifest, valid, max_len=200)
        print(
            f"{name} {version}: valid accuracy {result.accuracy:.4f}  loss {result.loss:.4f} "
            f"({result.count} sequences)"
        )
    print(
        f"retrain decision: {entry['decision']} ({entry['reason']}); rows {entry['rows']}; "
        f"total {time.monotonic() - started:.0f}s; work dir {work}"
    )


if __name__ == "__main__":
    main()
