"""The replay scenarios (simulations/scenarios): seeded, valid, and shaped as they say."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from stream_rnn.replay.schedule import build_schedule
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.stream.codec import decode_dead_letter
from stream_rnn.train.data import check_event, events_to_records
from stream_rnn.train.vocab import Vocab

HERE = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scenario_catalog", HERE / "catalog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scenario_catalog"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


catalog = _load()


def _gen(name: str, seed: int = 1, **overrides: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = catalog.generate(catalog.SCENARIOS[name], seed=seed, **overrides)
    return rows


def _sequences(rows: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """(key, token times) of every sequence, split at each key's end."""
    open_: dict[str, list[float]] = {}
    out = []
    for r in rows:
        if r.get("type") == "token":
            open_.setdefault(r["key"], []).append(r["ts"])
        elif r.get("type") == "end":
            out.append((r["key"], open_.pop(r["key"])))
    return out + list(open_.items())


def test_seeded_reproducible_valid_and_in_time_order() -> None:
    a, b, c = _gen("mixed", 3), _gen("mixed", 3), _gen("mixed", 4)
    assert a == b and a != c
    assert [r["ts"] for r in a] == sorted(r["ts"] for r in a)
    good = [r for r in a if "type" in r]
    for i, row in enumerate(good):
        check_event(row, f"row {i}")  # the trainer's own event-log validation
    # a key's sequences never interleave: every end closes a sequence with tokens
    ends = sum(r["type"] == "end" for r in good)
    assert len(events_to_records(good, incomplete="drop")) == ends
    span = a[-1]["ts"] - a[0]["ts"]
    assert 0.9 * 60 < span <= 60.5  # the scenario's duration


def test_zipf_activity_over_keys() -> None:
    s = 1.1
    rows = _gen("zipf", sequences=4000, keys=2000)
    per_key = Counter(key for key, _ in _sequences(rows))
    ranked = [per_key[f"user-{r:05d}"] for r in range(2000)]
    expected = 1 / np.arange(1, 2001) ** s
    expected = expected / expected.sum() * 4000
    assert ranked[0] == pytest.approx(expected[0], rel=0.15)  # the hottest key
    top = sum(ranked[:20]) / 4000
    assert top == pytest.approx(expected[:20].sum() / 4000, abs=0.03)
    ranks = np.arange(1, 51)
    slope = np.polyfit(np.log(ranks), np.log(np.maximum(ranked[:50], 1)), 1)[0]
    assert slope == pytest.approx(-s, abs=0.3)
    uniform = Counter(key for key, _ in _sequences(_gen("steady")))
    assert max(uniform.values()) <= 10  # 400 sequences over 200 equally active keys


def test_sequence_length_distributions() -> None:
    steady = [len(t) for _, t in _sequences(_gen("steady"))]
    assert float(np.median(steady)) == pytest.approx(40, rel=0.15)  # lognormal, median 40
    assert np.std(np.log(steady)) == pytest.approx(0.5, abs=0.1)
    mixed = [len(t) for _, t in _sequences(_gen("lengths"))]
    assert max(mixed) <= 400 and min(mixed) >= 3
    long_share = sum(n >= 120 for n in mixed) / len(mixed)
    assert long_share == pytest.approx(0.25, abs=0.07)
    assert not any(12 < n < 120 for n in mixed)


def test_bursts_hold_their_share_of_starts() -> None:
    scenario = catalog.SCENARIOS["bursts"]
    rows = _gen("bursts", seed=2)
    windows = catalog.burst_windows(scenario, 2)
    assert len(windows) == 3
    starts = [t[0] - catalog.TS0 for _, t in _sequences(rows)]
    inside = sum(any(a <= x <= b + 0.05 for a, b in windows) for x in starts) / len(starts)
    by_chance = (1 - scenario.burst_share) * 3 * scenario.burst_s / scenario.duration_s
    assert inside == pytest.approx(scenario.burst_share + by_chance, abs=0.08)


def test_idle_gaps_longer_than_a_ttl_and_sessions_that_never_end() -> None:
    gaps = [max(np.diff(t), default=0.0) for _, t in _sequences(_gen("idle"))]
    assert sum(g >= 8.0 for g in gaps) / len(gaps) == pytest.approx(0.4, abs=0.1)
    rows = _gen("open")
    last: dict[str, str] = {}
    for r in rows:
        last[r["key"]] = r["type"]
    open_share = sum(t == "token" for t in last.values()) / len(last)
    assert open_share == pytest.approx(0.3, abs=0.08)
    assert all(t == "end" for t in {r["key"]: r["type"] for r in _gen("steady")}.values())


def test_malformed_messages_are_dead_lettered_with_the_reason_they_name() -> None:
    rows = _gen("malformed")
    bad = [r for r in rows if "expect" in r]
    assert len(bad) / len(rows) == pytest.approx(0.05, abs=0.005)
    reasons = Counter(r["expect"] for r in bad)
    assert set(reasons) == {b[0] for b in catalog._BAD}
    adapter, vocab = Adapter(), Vocab.from_tokens(list("abcdefghijklmnopqrstuvwxyz ."), "char")
    for i, row in enumerate(bad[:40]):
        value = (
            row["raw"].encode() if "raw" in row else __import__("base64").b64decode(row["raw_b64"])
        )
        key = None if row["key"] is None else row["key"].encode()
        decoded = adapter.decode([RawRecord(key, value, "t", 0, i)], vocab)
        if row["expect"] == "unknown_key":  # well formed: the engine finds no state for it
            assert decoded.events and row["key"].startswith("ghost-")
        else:
            reason = decode_dead_letter(decoded.dead_letters[0][1])["reason"]
            assert reason == row["expect"], row


def test_make_writes_a_file_that_replay_reads(tmp_path: Path) -> None:
    out = tmp_path / "open.jsonl"
    proc = subprocess.run(
        [sys.executable, str(HERE / "make.py"), "open", "--out", str(out), "--seed", "7",
         "--sequences", "50", "--task", "classify"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"scenario": "open"' in proc.stdout
    schedule = build_schedule(out, level="char")
    states = Counter(s.state for s in schedule.sequences)
    assert states["ended"] + states["open"] == 50 and states["open"] > 0
    assert all(s.label for s in schedule.sequences if s.state == "ended")
    assert math.isclose(schedule.duration, schedule.events[-1].t)
