"""simulations/broker_bench.py at a tiny scale on the session broker, so that it cannot rot.

Every path of the benchmark runs for real (worker and agent processes, the in-process
consumers, the paced latency run); the numbers themselves are not judged here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
BENCH = Path(__file__).resolve().parents[2] / "simulations" / "broker_bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("broker_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_path_of_the_broker_benchmark_measures(kafka_broker: str, tmp_path: Path) -> None:
    bench = load_bench()
    # A 2,000-token drain is too short to measure a maximum; a fixed latency rate keeps the
    # latency runs small whatever the drains measured.
    cfg = bench.BenchConfig(
        tokens=2_000,
        chunk=8,
        naive_tokens=200,
        keys=100,
        latency_seconds=2.0,
        latency_rate=500.0,
        fractions=(0.5,),
        drain_timeout_s=120.0,
    )
    results = bench.run(kafka_broker, cfg, tmp_path, log=lambda _line: None)

    rows = results["rows"]
    workers = {"worker", "worker_alo", "worker_chunks", "worker_chunks_alo"}
    assert set(rows) == workers | {
        "pipe", "ceiling", "direct", "queue", "take", "events", "naive", "engine", "engine_cold",
        "dense",
        "metrics_off", "metrics_on",
    }  # fmt: skip
    for name, row in rows.items():
        want = cfg.naive_tokens if name == "naive" else cfg.tokens
        assert row["tokens"] >= want, (name, row)
        assert row["rate"] > 0 and math.isfinite(row["rate"]), (name, row)
        # NaN when one poll saw the whole (tiny) drain; never negative
        assert not row.get("cpu_us_per_token", 0) < 0, (name, row)
    for name in workers:
        assert rows[name]["status"]["dead_letters"] == {}, name
        assert rows[name]["status"]["tokens"] >= cfg.tokens, name
    assert rows["worker"]["status"]["guarantee"] == "exactly-once"
    assert rows["worker_alo"]["status"]["guarantee"] == "at-least-once"
    assert rows["worker"]["status"]["transactions"] > 0
    # chunks: one message per chunk, every token counted
    assert rows["worker_chunks"]["status"]["messages"] == cfg.tokens // cfg.chunk
    ratios = results["ratios"]
    for name in (
        "worker/pipe",
        "worker_chunks/pipe",
        "worker/naive",
        "engine/dense",
        "engine_cold/dense",
    ):
        assert ratios[name] > 0, name

    assert set(results["curve"]) == workers
    for name, curve in results["curve"].items():
        [latency] = curve
        assert latency["fraction"] == 0.5 and latency["rate_target"] == 250.0
        # read_committed: every paced message's prediction arrives, once
        assert latency["sent"] > 0 and latency["received"] == latency["sent"], (name, latency)
        for which in ("worker_latency_s", "end_to_end_s"):
            p = latency[which]
            assert 0 <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"], (name, which, p)
        # the worker's own latency stops before delivery; end to end includes it
        assert latency["worker_latency_s"]["p50"] <= latency["end_to_end_s"]["p50"]

    text = bench.report(results)
    assert "targets (issue 10):" in text and "worker, at-least-once, chunks of 8" in text
    assert len(bench.targets(results)) == 8
    assert rows["metrics_on"]["scrapes"] >= 1 and rows["metrics_on"]["scrape_bytes"] > 1000
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{bench.README_START}\nstale block\n{bench.README_END}\nafter\n")
    bench.write_readme(readme, results, tmp_path / "curve.png")
    rewritten = readme.read_text()
    assert "stale block" not in rewritten and rewritten.endswith("after\n")
    assert "targets (issue 10):" in rewritten and "](curve.png)" in rewritten
    bench.plot_curve(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
