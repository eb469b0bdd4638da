"""The README's main-job command, end to end: train, score, and stream through a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.kafka
def test_demo_streams_the_held_out_set_through_kafka(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream_rnn", "demo", "--out", str(tmp_path), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # every streamed label equals the offline one, for all 200 held-out sequences
    assert "200/200" in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "classify" / "test_scores.jsonl").is_file()
    assert not (tmp_path / "stream" / "kafka" / "broker.pid").exists()  # the broker was stopped
