"""The README's main-job command, end to end: the whole loop through a real broker, reduced.

``stream-rnn demo`` trains v1, starts a broker and two exactly-once workers, replays a scenario
at a steady rate, trains v2 with another vocabulary on what was recorded (plus text with
characters v1 never saw) and hot-swaps it mid-stream (rewarm), SIGKILLs a worker, and writes the
report; ``--no-stream`` does the in-process part alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stream_rnn.ops.cli import cli
from stream_rnn.ops.processes import pid_alive

PNGS = ("latency_cdf.png", "throughput.png", "quality.png")


@pytest.mark.slow
@pytest.mark.kafka
def test_demo_runs_the_learning_loop_and_a_crash_through_kafka(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stream_rnn", "demo", "--out", str(tmp_path),
         "--sequences", "260", "--rate", "220", "--no-restart"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())

    # every guarantee check passed, in the summary and in the report
    assert summary["passed"], output
    assert all(check["passed"] is not False for check in summary["checks"]), summary["checks"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Guarantee checks: all passed" in report
    assert "| every message answered exactly once | pass |" in report

    # the learning loop: v2, a new model with another vocabulary (larger, shared characters at
    # other ids), announced, swapped in by both workers; every message sent after the swap was
    # answered by v2 (equal to v2's offline pass: the guarantee checks), and so was the last
    v1, v2 = summary["v1_version"], summary["v2_version"]
    assert v2 is not None and v2 != v1, summary["retrain"]
    assert summary["retrain"]["decision"] == "published", summary["retrain"]
    vocab = summary["retrain"]["vocabulary"]
    assert vocab["v2"] > vocab["v1"] and vocab["new"] >= 6 and vocab["moved"] >= 1, vocab
    # sequences that span the swap were checked too: v2 rewarmed their states from the tokens
    # seen under v1, mapped into its vocabulary
    assert any("reproduced under policy rewarm" in c["detail"] for c in summary["checks"]), summary[
        "checks"
    ]
    assert sorted(summary["swapped"]) == ["worker-1", "worker-2"]
    assert [v for v, _, _ in summary["versions"]] == [v1, v2]
    after = summary["after_swap"]
    assert after["predictions"] > 1000 and after["by_new_version"] == after["predictions"], after
    assert summary["last_prediction_version"] == v2

    # the crash: worker-2 was SIGKILLed after the swap, worker-1 took its partitions over, and
    # every offset (token, end, malformed message) was answered exactly once
    killed = summary["killed"]
    assert killed is not None and killed["name"] == "worker-2", summary["skipped"]
    assert max(summary["swapped"].values()) < killed["at"] < killed["took_over_at"]
    assert killed["partitions"] and not pid_alive(killed["pid"])
    counts = summary["counts"]
    assert counts["expected answers"] == counts["messages"] == counts["sent"]
    assert counts["unanswered"] == counts["answered twice"] == counts["duplicates"] == 0
    assert summary["workers_at_end"]["worker-1"]["assigned"] == [0, 1, 2, 3]

    # the report with its plots (the swap and the faults marked), and everything stopped
    for name in ("report.md", "report.html", *PNGS):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    for label in ("v2 announced", "worker-2 SIGKILL", "takeover"):
        assert any(text == label for _, text in summary["markers"]), summary["markers"]
    assert (tmp_path / "predictions.jsonl").is_file()
    assert not (tmp_path / "stream" / "kafka" / "broker.pid").exists()
    assert not any(pid_alive(w["pid"]) for w in summary["workers_at_end"].values())
    print(f"\ndemo (reduced): {summary['seconds']:.0f}s in the demo, "
          f"{time.monotonic() - started:.0f}s in all")  # fmt: skip


@pytest.mark.slow
def test_demo_no_stream_trains_and_replays_in_process(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["demo", "--out", str(tmp_path), "--no-stream", "--sequences", "40"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "inproc" and summary["passed"]
    assert summary["counts"]["unanswered"] == 0
    assert (tmp_path / "data" / "test_scores.jsonl").is_file()
    for name in ("report.md", "report.html", *PNGS):
        assert (tmp_path / "report" / name).is_file(), name
    assert not (tmp_path / "stream").exists()  # no broker, no workers
