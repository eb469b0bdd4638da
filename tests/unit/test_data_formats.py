"""Recorded-sequence formats: whole-sequence JSONL, event logs, round trips and every error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.train.data import (
    Record,
    events_to_records,
    is_event_log,
    iter_records,
    read_events,
    read_records,
    records_to_events,
    write_events,
    write_records,
)
from stream_rnn.train.exceptions import DataError
from stream_rnn.train.vocab import LabelSet, Vocab

REAL_DATA = Path("/work/shared/data/fortunes-langid/valid.jsonl")


def _write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _tok(key: str, token: str | int) -> dict[str, Any]:
    return {"key": key, "v": 1, "type": "token", "token": token}


def _end(key: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "v": 1, "type": "end", **extra}


# --- Record ---------------------------------------------------------------------------------


def test_record_items_by_level() -> None:
    r = Record("k", text="ab  cd", target="x y")
    assert r.items("char") == ["a", "b", " ", " ", "c", "d"]
    assert r.items("word") == r.items("token") == ["ab", "cd"]
    assert r.target_items("word") == ["x", "y"]
    assert r.target_items("char") == ["x", " ", "y"]
    t = Record("k", tokens=["a", 7], target=[1, "b"])
    assert t.items("char") == ["a", 7] and t.target_items("word") == [1, "b"]
    t.items("char").append("z")  # a copy: the record is unchanged
    assert t.tokens == ["a", 7]
    with pytest.raises(DataError, match="record 'k' has no 'target'; seq2seq data needs one"):
        Record("k", text="a").target_items("char")


def test_record_to_json_leaves_out_none() -> None:
    assert Record("k", text="a", label="x").to_json() == {"key": "k", "text": "a", "label": "x"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": ("a",)}, "'tokens' must be a list of strings or integers, got tuple"),
        ({"tokens": [2**64]}, r"'tokens'\[0\] must be a string or a 64-bit integer"),
        ({"tokens": ["a"], "text": "a"}, "give exactly one of 'tokens'"),
        ({}, "give exactly one of 'tokens'"),
        ({"text": b"a"}, "'text' must be a string, got bytes"),
        (
            {"text": "a", "label": 1},
            "'label' must be a string, got int 1; write it as a JSON string",
        ),
        ({"tokens": ["a"], "tags": ["x", "y"]}, "'tags' has 2 entries but there are 1 tokens"),
    ],
)
def test_record_validates_on_creation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=f"record 'k': {message}"):
        Record("k", **kwargs)


def test_write_records_rechecks_mutated_records(tmp_path: Path) -> None:
    r = Record("k", tokens=["a"], tags=["x"])
    r.tags = ["x", "y"]
    with pytest.raises(DataError, match="record 'k': 'tags' has 2 entries"):
        write_records(tmp_path / "out.jsonl", [r])


# --- whole-sequence JSONL -------------------------------------------------------------------


def test_whole_sequence_file_round_trip_and_default_keys(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "data.jsonl",
        '{"key": "a", "tokens": ["x", 3], "tags": ["N", "V"]}',
        "   ",
        '{"text": "h\u00e9\u2028llo", "label": "en"}\r',
        '{"key": "c", "text": "ab", "target": ["b", "a"]}',
    )
    records = read_records(path)
    assert records == [
        Record("a", tokens=["x", 3], tags=["N", "V"]),
        Record("data-3", text="h\u00e9\u2028llo", label="en"),
        Record("c", text="ab", target=["b", "a"]),
    ]
    assert list(iter_records(path)) == records
    assert write_records(tmp_path / "copy.jsonl", records) == 3
    assert read_records(tmp_path / "copy.jsonl") == records
    assert not is_event_log(path)


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    assert read_records(_write_lines(tmp_path / "empty.jsonl", "", "  ")) == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"key": "k", "tokens": {"a": 1}}', "'tokens' must be a list of strings or integers, got dict"),
        ('{"key": "k", "tokens": ["a", 1.5]}', r"'tokens'\[1\] must be a string or a 64-bit integer, got 1.5"),
        ('{"key": "k", "tokens": [true]}', r"'tokens'\[0\] must be a string or a 64-bit integer, got True"),
        ('{"key": "k"}', "give exactly one of 'tokens' \\(a list\\) and 'text' \\(a string\\)"),
        ('{"key": "k", "tokens": [], "text": ""}', "give exactly one of 'tokens'"),
        ('{"key": "k", "text": 5}', "'text' must be a string, got int"),
        ('{"key": 5, "text": "a"}', "'key' must be a non-empty string, got 5"),
        ('{"key": "", "text": "a"}', "'key' must be a non-empty string, got ''"),
        ('{"key": "k", "text": "a", "label": 3}', "'label' must be a string, got int 3; write it as a JSON string"),
        ('{"key": "k", "text": "a", "target": {"x": 1}}', "'target' must be a string or a list of strings or integers, got dict"),
        ('{"key": "k", "text": "a", "target": [null]}', r"'target'\[0\] must be a string or a 64-bit integer, got None"),
        ('{"key": "k", "tokens": ["a"], "tags": ["x", "y"]}', "'tags' has 2 entries but there are 1 tokens; give one per token"),
        ('{"key": "k", "tokens": ["a"], "tags": [1]}', "'tags' must be a list of strings, got \\[1\\]"),
        ('{"key": "k", "text": "a", "lable": "x"}', r"unknown field\(s\) \['lable'\]; a record may have key, tokens, text"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"key": "k", "text": "a"', "not valid UTF-8 JSON .*; put one object per line"),
        (b'{"key": "k", "text": "\xff"}', "not valid UTF-8 JSON"),
    ],
)  # fmt: skip
def test_malformed_record_line(tmp_path: Path, line: str | bytes, message: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", '{"key": "ok", "text": "fine"}', "", line)
    with pytest.raises(DataError, match=f"^line 3 of {re.escape(str(path))}: .*{message}"):
        read_records(path)


# --- event logs -----------------------------------------------------------------------------


def test_event_semantics_interleave_reset_reuse_and_labels() -> None:
    events = [
        _tok("a", "x"),
        _tok("b", 1),
        {"key": "a", "type": "token", "token": "y", "ts": 1700000000.5},  # "v" may be left out
        {"key": "b", "v": 1, "type": "reset"},
        {"key": "c", "v": 1, "type": "reset"},  # nothing open: no effect
        _tok("b", 2),
        _end("a", label="L", tags=["t1", "t2"]),
        _tok("a", "z"),
        _end("b", target="out"),
        _end("a"),
        _end("d", label="empty"),
    ]
    assert events_to_records(events) == [
        Record("a", tokens=["x", "y"], label="L", tags=["t1", "t2"]),
        Record("b", tokens=[2], target="out"),
        Record("a", tokens=["z"]),
        Record("d", tokens=[], label="empty"),
    ]


def test_unfinished_sequences_keep_drop_or_error() -> None:
    events = [_tok("a", "x"), _tok("b", "y"), _end("b", label="B")]
    assert events_to_records(events) == [
        Record("a", tokens=["x"]),
        Record("b", tokens=["y"], label="B"),
    ]
    assert events_to_records(events, incomplete="drop") == [Record("b", tokens=["y"], label="B")]
    with pytest.raises(
        DataError, match=r"events: 1 sequence\(s\) have no 'end' event \(keys \['a'\]\)"
    ):
        events_to_records(events, incomplete="error")
    with pytest.raises(DataError, match="incomplete must be 'keep', 'drop' or 'error'"):
        events_to_records(events, incomplete="ignore")  # type: ignore[arg-type]


def test_in_memory_event_errors_name_the_event() -> None:
    with pytest.raises(DataError, match="^event 2: 'type' must be 'token', 'end' or 'reset'"):
        events_to_records([_tok("a", "x"), {"key": "a", "type": "stop"}])
    with pytest.raises(
        DataError, match="^event 2: record 'a': 'tags' has 0 entries but there are 1"
    ):
        events_to_records([_tok("a", "x"), _end("a", tags=[])])


def test_records_to_events_in_order_with_ts() -> None:
    records = [Record("a", text="hi there", label="L"), Record("b", tokens=[5], tags=["T"])]
    events = records_to_events(records, level="word", with_ts=True)
    assert [(e["key"], e["type"], e.get("token")) for e in events] == [
        ("a", "token", "hi"),
        ("a", "token", "there"),
        ("a", "end", None),
        ("b", "token", 5),
        ("b", "end", None),
    ]
    assert events[2]["label"] == "L" and events[4]["tags"] == ["T"]
    assert all(e["v"] == 1 for e in events)
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(set(stamps)) and stamps[0] > 1.6e9
    assert events_to_records(events) == [Record("a", tokens=["hi", "there"], label="L"), records[1]]


def test_interleaving_is_seeded_mixes_keys_and_keeps_per_key_order() -> None:
    records = [Record(f"k{i % 7}", tokens=list(range(i, i + 10)), label=str(i)) for i in range(30)]
    plain = records_to_events(records)
    mixed = records_to_events(records, interleave_seed=3)
    assert mixed == records_to_events(records, interleave_seed=3)
    assert mixed != records_to_events(records, interleave_seed=4)
    assert mixed != plain and sorted(map(orjson.dumps, mixed)) == sorted(map(orjson.dumps, plain))
    for key in {r.key for r in records}:
        assert [e for e in mixed if e["key"] == key] == [e for e in plain if e["key"] == key]
    runs = sum(1 for x, y in zip(mixed, mixed[1:], strict=False) if x["key"] != y["key"])
    assert runs > 60  # 30 sequences of 11 events each come in many more than 30 runs
    assert events_to_records(mixed) == records


def test_event_log_files(tmp_path: Path) -> None:
    records = [Record("a", tokens=["x", "y"], label="A"), Record("b", tokens=[1], target=[2, 3])]
    path = tmp_path / "events.jsonl"
    events = records_to_events(records, interleave_seed=0, with_ts=True)
    assert write_events(path, events) == len(events)
    assert is_event_log(path)
    assert read_events(path) == events
    assert read_records(path) == records
    with pytest.raises(DataError, match="^event 1: 'key' must be a non-empty string"):
        write_events(tmp_path / "bad.jsonl", [{"type": "reset"}])


def test_iter_records_streams_event_logs_in_end_order(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    write_events(path, [_tok("a", "x"), _tok("b", "y"), _end("b"), _end("a"), _tok("c", "z")])
    assert [r.key for r in iter_records(path)] == ["b", "a", "c"]
    assert [r.key for r in read_records(path)] == ["a", "b", "c"]
    with pytest.raises(
        DataError, match=f"^{re.escape(str(path))}: 1 sequence\\(s\\) have no 'end' event"
    ):
        read_records(path, incomplete="error")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"key": "k", "v": 1, "type": "tok", "token": "a"}', "'type' must be 'token', 'end' or 'reset', got 'tok'; every line"),
        ('{"key": "k", "v": 1, "token": "a"}', "'type' must be 'token', 'end' or 'reset', got None"),
        ('{"key": "k", "v": 2, "type": "token", "token": "a"}', "unsupported message version 'v'=2; this reader understands v=1"),
        ('{"key": "k", "v": true, "type": "token", "token": "a"}', "unsupported message version 'v'=True"),
        ('{"v": 1, "type": "token", "token": "a"}', "'key' must be a non-empty string, got None"),
        ('{"key": ["k"], "v": 1, "type": "end"}', r"'key' must be a non-empty string, got \['k'\]"),
        ('{"key": "k", "v": 1, "type": "token"}', "a 'token' event needs a 'token' field"),
        ('{"key": "k", "v": 1, "type": "token", "token": [1]}', r"'token' must be a string or a 64-bit integer, got \[1\]"),
        ('{"key": "k", "v": 1, "type": "token", "token": false}', "'token' must be a string or a 64-bit integer, got False"),
        ('{"key": "k", "v": 1, "type": "token", "token": "a", "label": "x"}', r"field\(s\) \['label'\] not allowed on a 'token' event; allowed: \['key', 'token', 'ts', 'type', 'v'\]"),
        ('{"key": "k", "v": 1, "type": "reset", "token": "a"}', r"field\(s\) \['token'\] not allowed on a 'reset' event"),
        ('{"key": "k", "v": 1, "type": "token", "token": "a", "ts": "now"}', "'ts' must be a number \\(seconds since the epoch\\), got 'now'"),
        ('{"key": "k", "v": 1, "type": "end", "label": 1}', "'label' must be a string, got int 1"),
        ('{"key": "k", "v": 1, "type": "end", "target": 5}', "'target' must be a string or a list of strings or integers, got int"),
        ('{"key": "k", "v": 1, "type": "end", "tags": "NN"}', "'tags' must be a list of strings, got 'NN'"),
        ('{"key": "k", "v": 1, "type": "end", "tags": ["x", "y"]}', "record 'k': 'tags' has 2 entries but there are 1 tokens"),
        ('"token"', "expected a JSON object, got str"),
        ("{'key': 'k'}", "not valid UTF-8 JSON"),
    ],
)  # fmt: skip
def test_malformed_event_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write_lines(
        tmp_path / "events.jsonl", '{"key": "k", "v": 1, "type": "token", "token": "a"}', "", line
    )
    with pytest.raises(DataError, match=f"^line 3 of {re.escape(str(path))}: {message}"):
        read_records(path)


# --- the real data set ----------------------------------------------------------------------


@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"{REAL_DATA} is not present")
def test_reads_real_langid_file(tmp_path: Path) -> None:
    records = read_records(REAL_DATA)
    assert len(records) > 1000
    assert all(r.text and r.tokens is None and r.label for r in records)
    assert len({r.key for r in records}) == len(records)
    labels = LabelSet.build(r.label for r in records if r.label)
    assert {"de", "en", "pl"} <= set(labels.labels)
    vocab = Vocab.build((r.text for r in records if r.text), "char")
    assert all(vocab.detok(vocab.encode(r.items("char"))) == r.text for r in records[:200])
    write_records(tmp_path / "copy.jsonl", records)
    assert read_records(tmp_path / "copy.jsonl") == records


# --- properties -----------------------------------------------------------------------------

tokens_st = st.one_of(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1))


@st.composite
def record_st(draw: st.DrawFn) -> Record:
    key = draw(st.one_of(st.sampled_from(["a", "b", "ключ"]), st.text(min_size=1, max_size=6)))
    tokens = draw(st.lists(tokens_st, max_size=8))
    n = len(tokens)
    return Record(
        key,
        tokens=tokens,
        label=draw(st.none() | st.text(max_size=5)),
        target=draw(st.none() | st.text(max_size=5) | st.lists(tokens_st, max_size=4)),
        tags=draw(st.none() | st.lists(st.text(max_size=3), min_size=n, max_size=n)),
    )


@given(st.lists(record_st(), max_size=12), st.integers(0, 2**32))
def test_records_events_records_round_trip(records: list[Record], seed: int) -> None:
    assert events_to_records(records_to_events(records)) == records
    mixed = records_to_events(records, interleave_seed=seed, with_ts=seed % 2 == 0)
    assert events_to_records(mixed) == records


@settings(max_examples=40)
@given(st.lists(record_st(), max_size=8), st.integers(0, 1000))
def test_file_round_trips(
    tmp_path_factory: pytest.TempPathFactory, records: list[Record], seed: int
) -> None:
    folder = tmp_path_factory.mktemp("rt")
    write_records(folder / "records.jsonl", records)
    assert read_records(folder / "records.jsonl") == records
    write_events(folder / "events.jsonl", records_to_events(records, interleave_seed=seed))
    assert read_records(folder / "events.jsonl") == records


@given(st.lists(st.text(max_size=12), max_size=6), st.sampled_from(["char", "word"]))
def test_text_records_come_back_as_their_tokens(texts: list[str], level: Any) -> None:
    records = [Record(f"k{i}", text=t, label="x") for i, t in enumerate(texts)]
    back = events_to_records(records_to_events(records, level=level, interleave_seed=1))
    assert [r.tokens for r in back] == [r.items(level) for r in records]
    assert all(r.label == "x" and r.text is None for r in back)
