"""The replay report (Markdown, HTML, PNGs, terminal table), its checks failing when they
should, and the ``stream-rnn replay`` command end to end in process."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console
from stream_harness import make_model

from stream_rnn.engine.engine import Engine
from stream_rnn.ops.cli import cli
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import load_checkpoint
from stream_rnn.replay.analysis import Analysis, analyse
from stream_rnn.replay.inproc import InprocOptions, run_inproc
from stream_rnn.replay.report import PNGS, summary_table, write_report
from stream_rnn.replay.result import ReplayResult
from stream_rnn.replay.schedule import Schedule, Timing, build_schedule
from stream_rnn.train.data import records_to_events

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def replayed(tmp_path: Path) -> tuple[Schedule, ReplayResult, Any]:
    """12 sequences as a timed event log, plus one message without a key, replayed (--max)."""
    model_dir, _, records = make_model(tmp_path, "next-token", 12)
    model, manifest = load_checkpoint(model_dir)
    rows = records_to_events(records, interleave_seed=1, with_ts=True)
    rows.insert(
        5, {"key": None, "raw": '{"v":1,"type":"token","token":"a"}', "expect": "missing_key"}
    )
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    schedule = build_schedule(log, level="char", timing=Timing(fast=True))
    engine = Engine(model, manifest, capacity=4)
    result = run_inproc(schedule, engine, options=InprocOptions(fast=True, max_batch=16))
    return schedule, result, lambda v: (model, manifest) if v == manifest.version else None


def _analyse(replayed: tuple[Schedule, ReplayResult, Any], **kw: Any) -> Analysis:
    schedule, result, load = replayed
    return analyse(schedule, result, task="next-token", load=load, **kw)


def test_report_holds_every_section_and_readable_plots(
    replayed: tuple[Schedule, ReplayResult, Any], tmp_path: Path
) -> None:
    analysis = _analyse(replayed, markers=[(0.001, "worker 1 killed")])
    paths = write_report(tmp_path / "report", analysis, title="Replay of test data")
    names = {p.name for p in paths}
    assert names == {"report.md", "report.html", *PNGS}
    for name in PNGS:
        png = (tmp_path / "report" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    md = (tmp_path / "report" / "report.md").read_text()
    for needle in (
        "# Replay of test data",
        "## Guarantee checks: all passed",
        "| every message answered exactly once | pass |",
        "| predictions equal the offline pass of their version | pass |",
        "## Quality against the recorded ground truth",
        "| latency | p50 | p95 | p99 | max | mean |",
        "![latency CDF](latency_cdf.png)",
        "## Dead letters by reason",
        "| missing_key | 1 | 1 |",
        "| restores |",
        "| worker 1 killed |",
    ):
        assert needle in md, needle
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img src='throughput.png'" in html and "worker 1 killed" in html
    console = Console(record=True, width=200)
    console.print(summary_table(analysis))
    text = console.export_text()
    assert "latency p50 / p95 / p99 / max" in text and "pass" in text


def test_checks_fail_when_the_stream_is_wrong(replayed: tuple[Schedule, ReplayResult, Any]) -> None:
    schedule, result, load = replayed
    bad = copy.deepcopy(result)
    preds = [o for o in bad.outputs if o.kind == "prediction" and o.body["type"] == "next"]
    preds[3].body["next"]["probs"][0] += 1e-3  # a prediction that differs from offline
    bad.outputs.remove(preds[7])  # a message never answered
    bad.duplicates = 1
    analysis = analyse(schedule, bad, task="next-token", load=load)
    failed = {c.name for c in analysis.checks if c.passed is False}
    assert failed == {
        "every message answered exactly once",
        "predictions equal the offline pass of their version",
    }
    assert not analysis.passed and analysis.counts["unanswered"] == 1
    # a version without a model to check against is not checked, and says so
    unknown = analyse(schedule, result, task="next-token", load=lambda v: None)
    agreement = next(c for c in unknown.checks if c.name.startswith("predictions equal"))
    assert agreement.passed is None and "no model for version" in agreement.detail


def test_model_swaps_are_found_in_the_predictions(
    replayed: tuple[Schedule, ReplayResult, Any],
) -> None:
    schedule, result, load = replayed
    swapped = copy.deepcopy(result)
    late = sorted(swapped.outputs, key=lambda o: o.at)[len(swapped.outputs) // 2 :]
    for o in late:
        o.body["model_version"] = "m-v2"
    analysis = analyse(schedule, swapped, task="next-token", load=load)
    assert [v for v, _, _ in analysis.versions] == [result.versions_served[0], "m-v2"]
    assert [label for _, label in analysis.markers] == ["model m-v2"]
    assert set(analysis.quality_by_version) == {result.versions_served[0], "m-v2"}


def test_replay_command_writes_score_lines_and_the_report(tmp_path: Path) -> None:
    model_dir, data, records = make_model(tmp_path, "classify", 20)
    out, report = tmp_path / "replayed.jsonl", tmp_path / "report"
    runner = CliRunner()
    args = ["replay", "--data", str(data), "--model", str(model_dir), "--max", "--seed", "3"]
    result = runner.invoke(cli, [*args, "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    model, manifest = load_checkpoint(model_dir)
    want = list(score_records(model, manifest, records))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["key"], g["label"]) for g in got] == [(w["key"], w["label"]) for w in want]
    assert (report / "report.md").is_file() and (report / "latency_cdf.png").is_file()
    both = runner.invoke(cli, [*args, "--speed", "2"])
    assert both.exit_code != 0 and "at most one of --speed, --rate and --max" in both.output
