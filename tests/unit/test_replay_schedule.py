"""The replay schedule: timing from either format, raw lines, and the per-key bookkeeping."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.schedule import (
    DEFAULT_RATE,
    Timing,
    answer_expected,
    build_schedule,
    tokens_answered,
)
from stream_rnn.stream.codec import decode_event
from stream_rnn.train.data import Record, write_records

TS0 = 1_700_000_000.0


def _log(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tok(key: str, token: str, ts: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "v": 1, "type": "token", "token": token}
    if ts is not None:
        row["ts"] = TS0 + ts
    return row


def _end(key: str, ts: float | None = None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "v": 1, "type": "end", **extra}
    if ts is not None:
        row["ts"] = TS0 + ts
    return row


def test_event_log_keeps_its_gaps_divided_by_speed(tmp_path: Path) -> None:
    rows = [_tok("a", "x", 0.0), _tok("b", "y", 0.5), _tok("a", "z", 2.0), _end("a", 3.0)]
    log = _log(tmp_path / "e.jsonl", rows)
    for speed in (1.0, 4.0):
        schedule = build_schedule(log, level="char", timing=Timing(speed=speed))
        assert [e.t for e in schedule.events] == pytest.approx(
            [0, 0.5 / speed, 2 / speed, 3 / speed]
        )
    assert schedule.source == "events" and schedule.tokens == 3 and schedule.keys == 2
    # every message has its wire bytes, which a worker decodes to the same event
    first = decode_event(schedule.events[0].value)
    assert (type(first).__name__, first.token) == ("TokenEvent", "x")


def test_rate_spreads_tokens_evenly_and_controls_share_their_slot(tmp_path: Path) -> None:
    rows = [_tok("a", "x", 0.0), _tok("a", "y", 9.0), _end("a", 9.5), _tok("b", "z", 30.0)]
    log = _log(tmp_path / "e.jsonl", rows)
    schedule = build_schedule(log, level="char", timing=Timing(rate=100.0))
    assert [e.t for e in schedule.events] == pytest.approx([0.0, 0.01, 0.02, 0.02])


def test_a_log_without_ts_falls_back_to_the_rate_and_backwards_ts_are_clamped(
    tmp_path: Path,
) -> None:
    log = _log(tmp_path / "e.jsonl", [_tok("a", "x"), _tok("a", "y"), _end("a")])
    schedule = build_schedule(log, level="char")
    assert schedule.events[1].t == pytest.approx(1 / DEFAULT_RATE)
    assert "no ts" in schedule.notes[0]
    rows = [_tok("a", "x", 1.0), _tok("b", "y", 0.5), _tok("a", "z", 2.0)]
    schedule = build_schedule(_log(tmp_path / "b.jsonl", rows), level="char")
    assert [e.t for e in schedule.events] == [0.0, 0.0, 1.0]
    assert "earlier" in schedule.notes[0]


def test_whole_sequences_are_interleaved_by_seed_keeping_each_keys_order(tmp_path: Path) -> None:
    records = [Record(f"k{i}", text="abcdefgh"[: 3 + i % 4], label="l") for i in range(12)]
    data = tmp_path / "seqs.jsonl"
    write_records(data, records)
    runs = [build_schedule(data, level="char", timing=Timing(rate=50), seed=s) for s in (1, 1, 2)]
    order = [[(e.key, e.kind, e.token) for e in r.events] for r in runs]
    assert order[0] == order[1] and order[0] != order[2]
    assert [e.t for e in runs[0].events if e.kind == "token"][:3] == pytest.approx([0, 0.02, 0.04])
    for rec in records:
        tokens = [e.token for e in runs[2].events if e.key == rec.key and e.kind == "token"]
        assert tokens == list(str(rec.text))
    info = runs[0].sequences
    assert [s.key for s in info] == [r.key for r in records]  # the order they begin
    assert {s.state for s in info} == {"ended"} and {s.label for s in info} == {"l"}


def test_raw_lines_are_sent_as_they_are_with_their_expected_reason(tmp_path: Path) -> None:
    rows = [
        _tok("a", "x", 0.0),
        {"key": "bad", "raw": '{"v":2,"type":"token","token":"a"}', "ts": TS0 + 0.1, "expect": "bad_version"},
        {"key": None, "raw_b64": base64.b64encode(b"\xff").decode(), "expect": "not_json"},
        _end("a", 1.0),
    ]  # fmt: skip
    schedule = build_schedule(_log(tmp_path / "e.jsonl", rows), level="char")
    raw = [e for e in schedule.events if e.kind == "raw"]
    assert [(e.key, e.value, e.expect) for e in raw] == [
        ("bad", b'{"v":2,"type":"token","token":"a"}', "bad_version"),
        (None, b"\xff", "not_json"),
    ]
    assert raw[1].t == raw[0].t  # no ts: sent with the message before it
    bad = [*rows[:1], {"key": "k", "raw": "x", "expect": "no_such_reason"}]
    with pytest.raises(ReplayError, match="no dead-letter reason"):
        build_schedule(_log(tmp_path / "bad.jsonl", bad), level="char")
    with pytest.raises(ReplayError, match="raw line"):
        build_schedule(_log(tmp_path / "bad2.jsonl", [*rows[:1], {"key": "k"}]), level="char")


def test_keys_are_followed_like_the_engine_follows_them(tmp_path: Path) -> None:
    rows = [
        _tok("a", "x", 0.0),
        {"key": "a", "v": 1, "type": "reset", "ts": TS0 + 0.1},  # discards a's first sequence
        _end("a", 0.2),  # no token since the reset: the engine refuses it
        _tok("a", "y", 0.3),
        _tok("a", "z", 0.4),
        _end("a", 0.5, label="L", tags=["t1", "t2"]),
        _end("b", 0.6),  # b never had a state
        _tok("a", "w", 0.7),  # a's third sequence stays open
    ]
    schedule = build_schedule(_log(tmp_path / "e.jsonl", rows), level="char")
    seqs = schedule.sequences
    assert [(s.key, s.number, s.items, s.state) for s in seqs] == [
        ("a", 0, ["x"], "reset"),
        ("a", 1, ["y", "z"], "ended"),
        ("a", 2, ["w"], "open"),
    ]
    assert (seqs[1].label, seqs[1].tags) == ("L", ["t1", "t2"])
    assert [e.expect for e in schedule.events] == [
        None,
        None,
        "unknown_key",
        None,
        None,
        None,
        "unknown_key",
        None,
    ]
    assert [(e.seq, e.pos) for e in schedule.events if e.kind == "token"] == [
        (0, 0),
        (1, 0),
        (1, 1),
        (2, 0),
    ]
    # next-token models answer every message; classify ones (no running estimate) not tokens
    assert all(answer_expected(schedule, tokens_answered("next-token")))
    assert answer_expected(schedule, tokens_answered("classify")) == [
        e.kind != "token" for e in schedule.events
    ]


def test_bad_input_is_refused_with_the_line(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        build_schedule(tmp_path / "missing.jsonl", level="char")
    log = _log(tmp_path / "e.jsonl", [_tok("a", "x"), {"key": "a", "v": 1, "type": "tokken"}])
    with pytest.raises(ReplayError, match="line 2"):
        build_schedule(log, level="char")
    with pytest.raises(ReplayError, match="speed"):
        Timing(speed=0)
