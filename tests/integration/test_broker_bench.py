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
    # latency run small whatever the drain measured.
    cfg = bench.BenchConfig(
        tokens=2_000,
        naive_tokens=200,
        keys=100,
        latency_seconds=3.0,
        latency_rate=500.0,
        drain_timeout_s=120.0,
    )
    results = bench.run(kafka_broker, cfg, tmp_path, log=lambda _line: None)

    rows = results["rows"]
    assert set(rows) == {
        "worker", "worker_alo", "ceiling", "direct", "queue", "take", "events", "naive"
    }  # fmt: skip
    for name, row in rows.items():
        want = cfg.naive_tokens if name == "naive" else cfg.tokens
        assert row["tokens"] >= want, (name, row)
        assert row["rate"] > 0 and math.isfinite(row["rate"]), (name, row)
        # NaN when one poll saw the whole (tiny) drain; never negative
        assert not row["cpu_us_per_token"] < 0, (name, row)
    assert rows["worker"]["status"]["dead_letters"] == {}
    assert rows["worker"]["status"]["guarantee"] == "exactly-once"
    assert rows["worker_alo"]["status"]["guarantee"] == "at-least-once"
    assert rows["worker"]["status"]["transactions"] > 0
    ratios = results["ratios"]
    assert ratios["worker/ceiling"] > 0 and ratios["worker/naive"] > 0
    assert ratios["exactly-once/at-least-once"] > 0

    for key in ("latency", "latency_alo"):
        latency = results[key]
        # read_committed: every paced token's prediction arrives, once
        assert latency["sent"] > 0 and latency["received"] == latency["sent"], latency
        for which in ("worker_latency_s", "end_to_end_s"):
            p = latency[which]
            assert 0 <= p["p50"] <= p["p99"] <= p["max"], (key, which, p)
        # the worker's own latency stops before delivery; end to end includes it
        assert latency["worker_latency_s"]["p50"] <= latency["end_to_end_s"]["p50"]

    text = bench.report(results)
    assert "targets:" in text and "exactly-once latency at" in text
