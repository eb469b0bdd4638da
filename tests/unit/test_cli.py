"""The stream-rnn command line, end to end on small synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stream_rnn.ops.cli import cli


def _walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, (*prefix, name))


def test_every_command_has_help() -> None:
    runner = CliRunner()
    paths = list(_walk(cli))
    assert {
        ("train",),
        ("score",),
        ("generate",),
        ("grad-report",),
        ("demo",),
        ("data", "synth"),
        ("kafka", "up"),
    } <= set(paths)
    for path in paths:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_train_score_generate_info(workdir: Path) -> None:
    data = workdir / "nt"
    _ok(
        [
            "data",
            "synth",
            "--task",
            "next-token",
            "--out-dir",
            str(data),
            "--n-train",
            "150",
            "--n-valid",
            "30",
            "--n-test",
            "5",
        ]
    )
    assert (data / "train.jsonl").is_file()
    model = workdir / "model"
    _ok(
        [
            "train",
            "--data",
            str(data / "train.jsonl"),
            "--valid",
            str(data / "valid.jsonl"),
            "--task",
            "next-token",
            "--cell",
            "lstm",
            "--layers",
            "2",
            "--hidden",
            "24",
            "--embed",
            "8",
            "--epochs",
            "2",
            "--tbptt",
            "8",
            "16",
            "--teacher-forcing",
            "0.9",
            "--tf-schedule",
            "linear",
            "--out",
            str(model),
            "--grad-report",
            str(workdir / "grads"),
        ]
    )
    assert (model / "manifest.json").is_file() and (model / "weights.safetensors").is_file()
    assert (workdir / "grads" / "grad_norms.png").read_bytes()[:4] == b"\x89PNG"
    out = workdir / "scores.jsonl"
    _ok(["score", "--model", str(model), "--data", str(data / "test.jsonl"), "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5 and all(len(x["next"][0]["tokens"]) == 5 for x in lines)
    a = _ok(["generate", "--model", str(model), "--prompt", "the ", "-n", "20", "--seed", "3"])
    b = _ok(["generate", "--model", str(model), "--prompt", "the ", "-n", "20", "--seed", "3"])
    assert a == b and a.startswith("the ")
    info = json.loads(_ok(["info", "--model", str(model)]))
    assert info["model_config"]["num_layers"] == 2 and info["training"]["tbptt_k1"] == 8


def test_convert_round_trip(workdir: Path) -> None:
    data = workdir / "cls"
    _ok(
        [
            "data",
            "synth",
            "--task",
            "classify",
            "--out-dir",
            str(data),
            "--n-train",
            "20",
            "--n-valid",
            "2",
            "--n-test",
            "2",
        ]
    )
    _ok(
        [
            "data",
            "convert",
            str(data / "train.jsonl"),
            str(workdir / "ev.jsonl"),
            "--to",
            "events",
            "--interleave-seed",
            "1",
        ]
    )
    _ok(
        [
            "data",
            "convert",
            str(workdir / "ev.jsonl"),
            str(workdir / "back.jsonl"),
            "--to",
            "sequences",
        ]
    )
    events = [json.loads(x) for x in (workdir / "ev.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "end" for e in events) == 20
    back = [json.loads(x) for x in (workdir / "back.jsonl").read_text().splitlines()]
    orig = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    assert [b["label"] for b in back] == [o["label"] for o in orig]
    assert ["".join(b["tokens"]) for b in back] == [o["text"] for o in orig]


def test_grad_report_compares_cells(workdir: Path) -> None:
    out = _ok(
        ["grad-report", "--out", str(workdir / "cmp"), "--cells", "rnn_tanh,gru", "--length", "40"]
    )
    assert "rnn_tanh" in out and "gru" in out
    rows = (workdir / "cmp" / "grad_norms.csv").read_text().splitlines()
    assert rows[0] == "name,t,steps_before_loss,grad_norm" and len(rows) == 1 + 2 * 40


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_rnn", *args], capture_output=True, text=True, timeout=120
    )


def test_user_errors_are_one_clear_line(workdir: Path, tmp_path: Path) -> None:
    bad = _run(
        "score", "--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), "--out", "x"
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    (tmp_path / "d.jsonl").write_text('{"key": "a", "tokens": {"x": 1}}\n')
    bad = _run(
        "score",
        "--model",
        str(workdir / "model"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
    )
    assert bad.returncode == 2 and "line 1 of" in bad.stderr and "Traceback" not in bad.stderr
    bad = _run("info", "--model", str(tmp_path))
    assert bad.returncode == 2 and "manifest.json is missing" in bad.stderr


def test_stream_commands_offer_the_guarantee_flags() -> None:
    runner = CliRunner()
    worker = runner.invoke(cli, ["worker", "--help"]).output
    for flag in ("--guarantee", "--commit-interval", "--state-retention", "--broker-timeout"):
        assert flag in worker, flag
    assert "exactly-once" in worker and "at-least-once" in worker
    collect = runner.invoke(cli, ["collect", "--help"]).output
    assert "--isolation" in collect and "read_committed" in collect
    bad = runner.invoke(cli, ["worker", "--model", ".", "--guarantee", "sometimes"])
    assert bad.exit_code == 2 and "sometimes" in bad.output
