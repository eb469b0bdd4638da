"""`stream-rnn retrain --data`: holdout, candidate against production, publish or keep, log, metrics.

Production versions are small models written with `save_checkpoint` and published with
`Registry`; every run trains a few epochs of a tiny GRU, so each test takes seconds.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.cli import cli
from stream_rnn.ops.retrain import Announce, FileSource, RetrainJob, run_every, run_once
from stream_rnn.ops.retrain_report import LogCollector, read_log, summary_line
from stream_rnn.registry import AnnouncementError, Registry, load_checkpoint, save_checkpoint
from stream_rnn.train.data import Record, write_records
from stream_rnn.train.exceptions import RetrainError
from stream_rnn.train.objectives import EvalResult
from stream_rnn.train.retrain import compare, relative_improvement, split_records
from stream_rnn.train.synthetic import generate
from stream_rnn.train.trainer import TrainConfig
from stream_rnn.train.vocab import Vocab

REPO = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--no-announce"]


# ------------------------------------------------------------------------------- helpers
def _labelled(n: int, seed: int) -> list[Record]:
    """Sequences over "ab" are labelled A, over "cd" B: learnable in a few epochs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice("AB")
        chars = "ab" if label == "A" else "cd"
        text = "".join(rng.choice(chars) for _ in range(rng.randint(4, 10)))
        out.append(Record(f"k{seed}-{i}", text=text, label=label))
    return out


def _publish_v1(registry: Path, out: Path, *, task: str, records: list[Record]) -> str:
    """An untrained v1 as production: random weights (next-token) or a classifier whose
    decoder always says A (classify), so that any learning beats it."""
    torch.manual_seed(0)
    vocab = Vocab.build([r.items("char") for r in records], "char")
    labels = ["A", "B"] if task == "classify" else None
    cfg = ModelConfig(
        task=task,  # type: ignore[arg-type]
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=8,
        hidden_size=16,
        num_labels=2 if labels else 0,
    )
    model = RecurrentModel(cfg)
    if task == "classify":
        with torch.no_grad():
            model.decoder.weight.zero_()
            model.decoder.bias.copy_(torch.tensor([1.0, 0.0]))
    manifest = save_checkpoint(out, model.eval(), vocab=vocab.to_dict(), labels=labels)
    reg = Registry(registry)
    reg.add(out)
    reg.promote(manifest.version)
    return manifest.version


def _retrain(*args: str) -> Result:
    return CliRunner().invoke(cli, ["retrain", *args])


def _ok(*args: str) -> str:
    result = _retrain(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _log(path: Path) -> list[dict]:
    return list(read_log(path))


def _metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# --------------------------------------------------------------------------- pure parts
def test_split_holds_out_the_most_recent_rows_and_validates_on_a_sample() -> None:
    records = [Record(f"k{i}", tokens=["a"]) for i in range(20)]
    split = split_records(records, 0.2, valid=0.1, seed=3)
    assert [r.key for r in split.holdout] == ["k16", "k17", "k18", "k19"]
    assert len(split.valid) == 2 and len(split.train) == 14
    seen = {r.key for r in split.train} | {r.key for r in split.valid}
    assert seen == {f"k{i}" for i in range(16)}
    assert split_records(records, 0.2, valid=0.1, seed=3) == split  # seeded
    assert len(split_records(records[:3], 0.2).train) == 1
    with pytest.raises(RetrainError, match="2 sequences are too few"):
        split_records(records[:2], 0.2)
    with pytest.raises(RetrainError, match="--holdout 1.5 must be a fraction"):
        split_records(records, 1.5)


def test_compare_uses_the_primary_metric_and_a_relative_margin() -> None:
    prod = EvalResult(loss=2.0, accuracy=0.5, count=10)
    cand = EvalResult(loss=1.8, accuracy=0.5, count=10)
    verdict = compare("next-token", cand, prod, margin=0.05)
    assert verdict.metric == "loss" and not verdict.higher_is_better
    assert verdict.improvement == pytest.approx(0.1) and verdict.better
    assert not compare("next-token", cand, prod, margin=0.1).better  # strictly more than
    assert not compare("next-token", prod, prod, margin=0.0).better  # a tie is not better
    tie = compare("classify", cand, prod, margin=0.0)  # classify: accuracy, equal
    assert tie.metric == "accuracy" and tie.improvement == 0 and not tie.better
    assert relative_improvement(0.6, 0.5, True) == pytest.approx(0.2)
    assert relative_improvement(0.1, 0.0, True) == math.inf
    assert math.isnan(relative_improvement(math.nan, 1.0, False))
    assert not compare("tag", EvalResult(math.nan, 0.0, 1), prod, 0.0).better
    with pytest.raises(RetrainError, match="--margin -0.1"):
        compare("classify", cand, prod, margin=-0.1)


# ------------------------------------------------------------------------------- the CLI
def test_under_trained_production_is_beaten_and_published(tmp_path: Path) -> None:
    records = generate("next-token", 60, seed=0, min_len=12, max_len=24)
    data = tmp_path / "recorded.jsonl"
    write_records(data, records)
    registry = tmp_path / "registry"
    v1 = _publish_v1(registry, tmp_path / "v1", task="next-token", records=records)
    prom = tmp_path / "retrain.prom"

    out = _ok("--registry", str(registry), "--data", str(data), "--metrics-file", str(prom), *FAST)

    reg = Registry(registry)
    v2 = reg.production()
    assert v2 is not None and v2 != v1
    assert reg.lineage(v2) == [v2, v1]
    info = reg.show(v2)
    assert info.manifest.model_config == reg.show(v1).manifest.model_config  # architecture kept
    assert info.manifest.vocab == reg.show(v1).manifest.vocab
    assert info.metrics["baseline_version"] == v1 and info.metrics["primary_metric"] == "loss"
    assert info.metrics["holdout"]["loss"] < info.metrics["production_holdout"]["loss"]
    assert info.data_window is not None and info.data_window["source"] == "file"
    assert info.data_window["path"] == str(data.absolute())

    [entry] = _log(registry / "retrain.jsonl")
    assert entry["decision"] == "published" and entry["version"] == v2
    assert entry["production"] == v1 and entry["parent_version"] == v1
    assert entry["rows"] == {"recorded": 60, "unknown_label": 0, "train": 43, "valid": 5, "holdout": 12}  # fmt: skip
    assert entry["metric"] == "loss" and entry["improvement"] > 0
    assert set(entry["candidate_metrics"]) == {"loss", "accuracy", "perplexity"}
    assert entry["candidate_metrics"]["loss"] < entry["production_metrics"]["loss"]
    assert entry["reason"].startswith("better: loss") and entry["announced"] is False
    assert entry["duration_s"] > 0 and entry["task"] == "next-token"
    assert summary_line(entry) in out
    assert f"retrain published {v2} (parent {v1}" in out

    samples = _metrics(prom)
    assert samples[("stream_rnn_retrain_runs_total", (("decision", "published"),))] == 1
    assert samples[("stream_rnn_retrain_runs_total", (("decision", "kept"),))] == 0
    assert samples[("stream_rnn_retrain_runs_total", (("decision", "failed"),))] == 0
    cand = samples[("stream_rnn_retrain_last_candidate_metric", (("metric", "loss"),))]
    prod = samples[("stream_rnn_retrain_last_production_metric", (("metric", "loss"),))]
    assert cand == pytest.approx(entry["candidate_metrics"]["loss"]) and cand < prod
    assert samples[("stream_rnn_retrain_duration_seconds", ())] == entry["duration_s"]
    assert not list(registry.glob(".retrain-*"))  # the candidate's work directory is gone
    # `retrain --every --metrics-port` serves the same numbers, read from the log at scrape time
    live = CollectorRegistry()
    live.register(LogCollector(registry / "retrain.jsonl"))
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(live).decode())
        for s in family.samples
    }
    assert scraped == samples


def test_metrics_port_belongs_to_a_schedule(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text("")
    result = CliRunner().invoke(
        cli, ["retrain", "--registry", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
              "--metrics-port", "9310"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--metrics-port serves metrics while --every runs" in result.output
    assert "--metrics-file" in result.output


def test_not_better_by_the_margin_is_kept_unless_forced(tmp_path: Path) -> None:
    records = _labelled(60, seed=1)
    data = tmp_path / "labelled.jsonl"
    write_records(data, records)
    registry = tmp_path / "registry"
    v1 = _publish_v1(registry, tmp_path / "v1", task="classify", records=records)
    log, prom = tmp_path / "runs.jsonl", tmp_path / "m.prom"
    # barely trained: the candidate moves a little, nowhere near 10x better accuracy
    common = ["--registry", str(registry), "--data", str(data), "--log", str(log),
              "--metrics-file", str(prom), "--epochs", "1", "--lr", "1e-6", "--no-announce"]  # fmt: skip

    out = _ok(*common, "--margin", "10")
    assert Registry(registry).production() == v1
    assert [i.version for i in Registry(registry).list()] == [v1]  # nothing registered
    [kept] = _log(log)
    assert kept["decision"] == "kept" and kept["version"] is None
    assert kept["metric"] == "accuracy" and kept["higher_is_better"] is True
    assert kept["reason"].startswith("not better: accuracy") and "margin 1000.00%" in kept["reason"]
    assert f"retrain kept {v1}: not better" in out

    _ok(*common, "--margin", "10", "--force")
    v2 = Registry(registry).production()
    assert v2 is not None and v2 != v1 and Registry(registry).lineage(v2) == [v2, v1]
    forced = _log(log)[-1]
    assert forced["decision"] == "published" and forced["force"] is True
    assert forced["reason"].startswith("forced (--force), although not better")
    assert Registry(registry).show(v2).metrics["forced"] is True

    samples = _metrics(prom)
    assert samples[("stream_rnn_retrain_runs_total", (("decision", "kept"),))] == 1
    assert samples[("stream_rnn_retrain_runs_total", (("decision", "published"),))] == 1

    # nothing learned at all: identical weights are never published, even forced
    _ok("--registry", str(registry), "--data", str(data), "--log", str(log), "--epochs", "1",
        "--lr", "0", "--force", "--no-announce")  # fmt: skip
    same = _log(log)[-1]
    assert same["decision"] == "kept" and "identical to production" in same["reason"]
    assert Registry(registry).production() == v2


def test_classify_learns_from_scratch_and_drops_unknown_labels(tmp_path: Path) -> None:
    records = _labelled(80, seed=2)
    records[5] = Record("odd", text="abab", label="Z")  # no output for Z in production
    data = tmp_path / "labelled.jsonl"
    write_records(data, records)
    registry = tmp_path / "registry"
    v1 = _publish_v1(registry, tmp_path / "v1", task="classify", records=records[:5])
    _ok("--registry", str(registry), "--data", str(data), "--from-scratch", "--epochs", "8",
        "--lr", "0.02", "--batch-size", "8", "--no-announce")  # fmt: skip
    [entry] = _log(registry / "retrain.jsonl")
    assert entry["decision"] == "published" and entry["from_scratch"] is True
    assert entry["rows"]["unknown_label"] == 1 and entry["rows"]["recorded"] == 80
    assert entry["candidate_metrics"]["accuracy"] > entry["production_metrics"]["accuracy"]
    v2 = Registry(registry).production()
    assert v2 is not None
    assert Registry(registry).show(v2).manifest.labels == ["A", "B"]  # production's order
    assert Registry(registry).show(v2).parent == v1


def test_refusals_are_clear_and_logged(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_records(data, generate("next-token", 2, seed=0))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    registry = tmp_path / "registry"
    prom = tmp_path / "m.prom"

    result = _retrain("--registry", str(registry), "--data", str(data), "--metrics-file", str(prom))
    assert isinstance(result.exception, RetrainError)
    assert "no production version" in str(result.exception)
    assert "stream-rnn models publish" in str(result.exception)
    assert "retrain failed after" in result.output
    [entry] = _log(registry / "retrain.jsonl")
    assert entry["decision"] == "failed" and entry["error"] == "RetrainError"
    assert _metrics(prom)[("stream_rnn_retrain_runs_total", (("decision", "failed"),))] == 1
    assert ("stream_rnn_retrain_last_candidate_metric", (("metric", "loss"),)) not in _metrics(prom)

    _publish_v1(registry, tmp_path / "v1", task="next-token", records=generate("next-token", 5, seed=0))  # fmt: skip
    result = _retrain("--registry", str(registry), "--data", str(data), "--no-announce")
    assert isinstance(result.exception, RetrainError)
    assert "2 sequences are too few" in str(result.exception)
    result = _retrain("--registry", str(registry), "--data", str(empty), "--no-announce")
    assert isinstance(result.exception, RetrainError)
    assert "no recorded sequences in" in str(result.exception)
    assert [e["decision"] for e in _log(registry / "retrain.jsonl")] == ["failed"] * 3

    for args, message in [
        ([], "give either --from-topic"),
        (["--data", str(data), "--from-topic"], "give either --from-topic"),
        (["--data", str(data), "--last", "1h"], "not with --data"),
        (["--data", str(data), "--every", "soon"], "--every 'soon' is not a duration"),
        (["--data", str(data), "--margin", "-1"], "-1"),
        (["--data", str(data), "--holdout", "1"], "--holdout"),
    ]:
        result = _retrain("--registry", str(registry), *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert len(_log(registry / "retrain.jsonl")) == 3  # usage errors are not runs

    key = tmp_path / "loose.key"
    key.write_text("0123456789abcdef0123")
    key.chmod(0o644)
    result = _retrain("--registry", str(registry), "--data", str(data), "--update-key-file", str(key))  # fmt: skip
    assert "chmod 600" in str(result.exception)
    assert len(_log(registry / "retrain.jsonl")) == 3  # a bad key fails before any run


def test_announcement_problems_before_and_after_the_registry_changes(tmp_path: Path) -> None:
    records = _labelled(40, seed=3)
    data = tmp_path / "labelled.jsonl"
    write_records(data, records)
    registry = tmp_path / "registry"
    v1 = _publish_v1(registry, tmp_path / "v1", task="classify", records=records)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01)
    job = RetrainJob(registry, FileSource(data), cfg, force=True, policy="keep")

    def unreachable() -> Announce:
        raise AnnouncementError("cannot reach Kafka at 127.0.0.1:1")

    result = run_once(job, prepare_announce=unreachable)
    assert isinstance(result.error, AnnouncementError)
    assert result.entry["decision"] == "failed" and "cannot reach Kafka" in result.entry["reason"]
    assert [i.version for i in Registry(registry).list()] == [v1]  # checked before any change

    # someone else promotes while the run trains: the stale candidate is not published over it
    other = tmp_path / "other"
    model, manifest = load_checkpoint(Registry(registry).path(v1))
    with torch.no_grad():
        model.decoder.bias.copy_(torch.tensor([0.0, 1.0]))
    save_checkpoint(other, model, vocab=manifest.vocab, labels=manifest.labels)

    def promote_meanwhile() -> Announce:
        manifest = Registry(registry).add(other)
        Registry(registry).promote(manifest.version)
        return lambda reg, version: True

    result = run_once(job, prepare_announce=promote_meanwhile)
    assert result.entry["decision"] == "failed"
    assert f"production moved from {v1} to" in result.entry["reason"]
    Registry(registry).rollback()

    told: list[str] = []

    def lost_broker() -> Announce:
        def announce(reg: Registry, version: str) -> bool:
            told.append(version)
            raise AnnouncementError("Kafka did not take the announcement")

        return announce

    result = run_once(job, prepare_announce=lost_broker)
    entry = result.entry
    assert isinstance(result.error, AnnouncementError) and told == [entry["version"]]
    assert entry["decision"] == "published" and entry["announced"] is False
    assert entry["announce_error"] == "Kafka did not take the announcement"
    assert Registry(registry).production() == entry["version"]  # the registry is the truth
    assert "NOT announced" in summary_line(entry)


# --------------------------------------------------------------------------- the schedule
def test_run_every_repeats_and_stops_between_runs() -> None:
    stop = threading.Event()
    calls: list[float] = []

    def run() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            stop.set()

    assert run_every(0.05, run, stop, tick_s=0.01) == 3
    assert calls[2] - calls[0] >= 0.09  # start to start

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert run_every(3600, lambda: None, stop, tick_s=1.0) == 1  # the wait ends at the stop
    assert time.monotonic() - started < 1.5


def test_every_logs_failed_runs_goes_on_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    write_records(data, generate("next-token", 10, seed=0))
    registry, log = tmp_path / "registry", tmp_path / "runs.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_rnn", "retrain", "--registry", str(registry),
         "--data", str(data), "--every", "200ms", "--log", str(log), "--no-announce"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(_log(log)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(_log(log)) >= 2, proc.stderr.read() if proc.poll() is not None else "slow"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    entries = _log(log)
    assert {e["decision"] for e in entries} == {"failed"}  # no production: every run fails
    assert "no production version" in err and "the loop goes on" in err
    assert f"stopped after {len(entries)} runs" in err
    assert out.count("retrain failed after") == len(entries)
