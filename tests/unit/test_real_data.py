"""Real data (../shared/data/fortunes-langid): a short run must already identify languages.

The full benchmark (97.95 % in 378 s, README) is `simulations/fortunes_benchmark.py`; this test
keeps CI honest with the same model trained for a single epoch (95.9 % there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rnn.predict.offline import score_records
from stream_rnn.registry import load_checkpoint
from stream_rnn.train.data import read_records
from stream_rnn.train.trainer import TrainConfig, train


@pytest.mark.slow
def test_language_id_from_streamed_characters(fortunes_dir: Path, tmp_path: Path) -> None:
    train_rows = read_records(fortunes_dir / "train.jsonl")
    valid_rows = read_records(fortunes_dir / "valid.jsonl")
    cfg = TrainConfig(
        task="classify", cell="gru", hidden=128, embed=64, epochs=1, batch_size=32, lr=3e-3
    )
    result = train(cfg, train_rows, valid_rows, tmp_path)
    accuracy = result.manifest.metrics["valid"]["accuracy"]
    assert accuracy >= 0.93, f"7 languages, chance ~0.15; got {accuracy:.3f}"
    # the checkpoint scores the same rows offline with the same accuracy
    model, manifest = load_checkpoint(tmp_path)
    lines = list(score_records(model, manifest, valid_rows))
    scored = sum(line["label"] == r.label for line, r in zip(lines, valid_rows, strict=True))
    assert scored / len(valid_rows) == pytest.approx(accuracy, abs=1e-9)
