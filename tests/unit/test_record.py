"""`stream-rnn record` without Kafka: reassembly, windows, durations, the atomic writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition

from stream_rnn.stream import record as record_mod
from stream_rnn.stream.codec import encode_event
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.record import (
    Fetched,
    Reassembler,
    Recording,
    Window,
    parse_duration,
    parse_time,
    reassemble,
    resolve_window,
    write_atomic,
)
from stream_rnn.train.data import Record, read_records
from stream_rnn.train.exceptions import DataError


class Log:
    """Kafka records by hand: offsets count up per partition, timestamps per record."""

    def __init__(self) -> None:
        self.records: list[Fetched] = []
        self._next: dict[int, int] = {}

    def raw(self, key: bytes | None, value: bytes | None, partition: int = 0) -> Log:
        offset = self._next.get(partition, 0)
        self._next[partition] = offset + 1
        self.records.append(Fetched(partition, offset, key, value, 1000 + len(self.records)))
        return self

    def event(self, key: str, partition: int = 0, **event: Any) -> Log:
        return self.raw(key.encode(), encode_event(event), partition)

    def tokens(self, key: str, tokens: str, partition: int = 0) -> Log:
        for t in tokens:
            self.event(key, partition, type="token", token=t)
        return self

    def end(self, key: str, partition: int = 0) -> Log:
        return self.event(key, partition, type="end")


def _seqs(rec: Recording) -> list[tuple[str, list[Any], str | None]]:
    return [(r.key, r.tokens or [], r.label) for r in rec.records]


# ------------------------------------------------------------------------------ reassembly
def test_interleaved_keys_are_reassembled_in_offset_order_and_ordered_by_start() -> None:
    log = Log()
    for a, b in zip("abc", "xyz", strict=True):  # two keys, one partition, token by token
        log.event("k1", type="token", token=a).event("k2", type="token", token=b)
    log.tokens("k3", "pq", partition=1).event("k3", 1, type="token", token=7)
    log.end("k2").end("k1").end("k3", partition=1)
    rec = reassemble(log.records)
    # k1 started first (timestamp 1000), then k2, then k3 on partition 1
    assert _seqs(rec) == [
        ("k1", ["a", "b", "c"], None),
        ("k2", ["x", "y", "z"], None),
        ("k3", ["p", "q", 7], None),
    ]
    assert (rec.tokens, rec.keys, rec.events, rec.open_sequences) == (9, 3, 12, 0)
    assert not rec.malformed and rec.cut == 0


def test_end_splits_a_key_into_sequences_and_partitions_interleave_freely() -> None:
    log = Log().tokens("k", "ab").end("k").tokens("j", "z", partition=1).tokens("k", "cde")
    log.end("k").end("j", partition=1).tokens("k", "f").end("k")
    # feeding one partition's records apart from the other's gives the same result
    by_partition = sorted(log.records, key=lambda r: r.partition)
    for records in (log.records, by_partition):
        machine = Reassembler()
        machine.feed(records[:4])
        machine.feed(records[4:])
        assert _seqs(machine.finish()) == [
            ("k", ["a", "b"], None),
            ("j", ["z"], None),
            ("k", ["c", "d", "e"], None),
            ("k", ["f"], None),
        ]


def test_the_label_an_end_carries_becomes_the_record_label() -> None:
    log = Log().tokens("a", "xy").tokens("b", "zz").tokens("c", "q")
    log.raw(b"a", b'{"v":1,"type":"end","label":"spam"}')
    log.raw(b"b", b'{"v":1,"type":"end","label":"ham"}')
    log.raw(b"c", b'{"v":1,"type":"end"}')
    log.tokens("a", "w").raw(b"a", b'{"v":1,"type":"end","label":"spam"}').tokens("d", "open")
    everything = reassemble(log.records)
    assert _seqs(everything) == [
        ("a", ["x", "y"], "spam"),
        ("b", ["z", "z"], "ham"),
        ("c", ["q"], None),
        ("a", ["w"], "spam"),
        ("d", ["o", "p", "e", "n"], None),
    ]
    assert everything.labels == {"spam": 2, "ham": 1}
    classify = reassemble(log.records, task="classify")
    assert _seqs(classify) == [
        ("a", ["x", "y"], "spam"),
        ("b", ["z", "z"], "ham"),
        ("a", ["w"], "spam"),
    ]
    # the unlabelled end and the open sequence (no end, so no label) are dropped and counted
    assert (classify.unlabelled, classify.open_sequences) == (2, 1)
    assert any("2 without a label (--task classify)" in line for line in classify.summary())


def test_open_sequences_are_kept_or_dropped_and_reported() -> None:
    log = Log().tokens("done", "ab").end("done").tokens("open1", "cd").tokens("open2", "e", 2)
    kept = reassemble(log.records)
    want = [("done", ["a", "b"], None), ("open1", ["c", "d"], None), ("open2", ["e"], None)]
    assert _seqs(kept) == want
    assert kept.open_sequences == 2
    assert "open sequences at the end of the window: 2, kept (unlabelled)" in kept.summary()
    dropped = reassemble(log.records, open_policy="drop")
    assert _seqs(dropped) == [("done", ["a", "b"], None)]
    assert dropped.open_sequences == 2
    assert "open sequences at the end of the window: 2, dropped (--open drop)" in dropped.summary()


def test_malformed_records_are_counted_by_reason_and_never_stop_the_recording() -> None:
    log = Log().tokens("k", "a")
    log.raw(b"k", b"not json")
    log.raw(b"k", None)  # a tombstone
    log.raw(None, encode_event({"type": "token", "token": "lost"}))  # no key
    log.raw(b"\xff", encode_event({"type": "token", "token": "lost"}))  # key not UTF-8
    log.raw(b"k", b'{"v":2,"type":"token","token":"x"}')
    log.raw(b"k", b'{"v":1,"type":"token"}')
    log.raw(b"k", b'{"v":1,"type":"end","colour":"red"}')  # not a field of `end`
    log.raw(b"k", b'{"v":1,"type":"token","token":"' + b"y" * 5000 + b'"}')
    log.raw(b"k", b"[1, 2]")
    log.tokens("k", "b").end("k")
    rec = reassemble(log.records)
    assert _seqs(rec) == [("k", ["a", "b"], None)]  # the bad end did not close the sequence
    assert rec.malformed == {
        "not_json": 2,
        "missing_key": 2,
        "bad_version": 1,
        "missing_field": 1,
        "extra_field": 1,
        "oversized": 1,
        "not_object": 1,
    }
    assert len(rec.malformed_examples) == Reassembler.EXAMPLES
    assert rec.malformed_examples[0].startswith("0:1 not_json:")
    summary = "\n".join(rec.summary())
    assert "malformed: 9 (" in summary and "e.g. 0:1 not_json" in summary
    # the worker's --max-bytes applies: a larger limit takes the long token
    assert reassemble(log.records, max_bytes=8192).malformed["oversized"] == 0


def test_reset_discards_generate_is_ignored_and_short_sequences_are_dropped() -> None:
    log = Log().tokens("k", "abc").event("k", type="reset").tokens("k", "de")
    log.event("k", type="generate", n=3).tokens("k", "f").end("k")
    log.tokens("s", "x").end("s").end("s")  # one token, then an end with no token at all
    rec = reassemble(log.records)
    assert _seqs(rec) == [("k", ["d", "e", "f"], None), ("s", ["x"], None)]
    assert (rec.resets, rec.generates, rec.too_short) == (1, 1, 1)
    longer = reassemble(log.records, min_tokens=2)
    assert _seqs(longer) == [("k", ["d", "e", "f"], None)] and longer.too_short == 2
    summary = longer.summary()
    assert "dropped: 2 shorter than --min-tokens 2, 1 discarded by reset" in summary
    assert "ignored: 1 generate events (no part of a sequence)" in summary


def test_first_sequences_of_a_cut_partition_are_flagged() -> None:
    # partition 0's window starts mid-log: k's first tokens may continue an earlier sequence,
    # j's end shows that its first sequence did; partition 1 starts at the log start.
    log = Log().tokens("k", "ab").end("k").tokens("k", "c").end("k")
    log.end("j").tokens("j", "xy").end("j").tokens("m", "q", partition=1).end("m", 1)
    rec = reassemble(log.records, cut_partitions=[0])
    assert _seqs(rec)[0] == ("k", ["a", "b"], None)
    assert rec.cut == 1 and rec.too_short == 1  # j's head: an end with no token in the window
    assert any("1 sequences may have begun before the window start" in s for s in rec.summary())
    assert reassemble(log.records).cut == 0


def test_a_key_on_two_partitions_makes_sequences_per_partition() -> None:
    log = Log().tokens("k", "ab", partition=0).tokens("k", "xy", partition=1)
    log.end("k", partition=1).end("k", partition=0)
    rec = reassemble(log.records)
    assert sorted(_seqs(rec)) == [("k", ["a", "b"], None), ("k", ["x", "y"], None)]
    assert rec.split_keys == 1


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(StreamError, match="next-token or classify"):
        Reassembler(task="tag")  # type: ignore[arg-type]
    with pytest.raises(StreamError, match="keep or drop"):
        Reassembler(open_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(StreamError, match="at least 1 token"):
        Reassembler(min_tokens=0)


# ------------------------------------------------------------------- durations and windows
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        (" 1.5H ", 5400.0),
        ("1d 12h", 129600.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30", "'30' has no unit; write 30s, 30m, 30h or 30d"),
        ("10x", "'10x' is not a duration"),
        ("h", "'h' is not a duration"),
        ("-5m", "'-5m' is not a duration"),
        ("1h-30m", "is not a duration"),
        ("", "--last is empty"),
        ("0s", "'0s' is zero"),
    ],
)
def test_bad_durations_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(StreamError, match=message.replace("(", r"\(")) as err:
        parse_duration(text)
    assert "\n" not in str(err.value)


def test_times_are_iso_8601_and_utc_without_an_offset() -> None:
    noon = 1714564800.0  # 2024-05-01T12:00:00Z
    assert parse_time("2024-05-01T12:00:00Z") == noon
    assert parse_time("2024-05-01T12:00:00z") == noon
    assert parse_time("2024-05-01T14:00:00+02:00") == noon
    assert parse_time("2024-05-01T12:00") == noon
    assert parse_time("2024-05-01 12:00:00.250") == noon + 0.25
    assert parse_time("2024-05-01") == noon - 12 * 3600
    for bad in ("yesterday", "2024-13-01", "", "1714564800"):
        with pytest.raises(StreamError, match="is not an ISO 8601 time; write it like"):
            parse_time(bad, "--until")
    with pytest.raises(StreamError, match="before 1970"):
        parse_time("1969-12-31T23:00:00Z")


def test_windows() -> None:
    now = 1714564800.0
    assert resolve_window(since=None, last=None, until=None, now=now) == Window()
    assert resolve_window(since=None, last="2h", until=None, now=now) == Window(
        int((now - 7200) * 1000), None
    )
    both = resolve_window(since="2024-05-01", last=None, until="2024-05-01T12:00Z", now=now)
    assert both == Window(int((now - 43200) * 1000), int(now * 1000))
    assert "2024-05-01T00:00:00+00:00" in both.describe()
    with pytest.raises(StreamError, match="give --since or --last, not both"):
        resolve_window(since="2024-05-01", last="1h", until=None, now=now)
    with pytest.raises(StreamError, match="--until 2024-04-01 is not after the window start"):
        resolve_window(since="2024-05-01", last=None, until="2024-04-01", now=now)
    with pytest.raises(StreamError, match="not after the window start \\(now-1h\\)"):
        resolve_window(since=None, last="1h", until="2024-05-01T11:00Z", now=now)
    with pytest.raises(StreamError, match="not after"):  # an empty window is a mistake too
        resolve_window(since="2024-05-01", last=None, until="2024-05-01", now=now)


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "r.jsonl")
    for args, message in (
        (["--last", "10x"], "error: --last '10x' is not a duration"),
        (["--since", "2024-05-02", "--until", "2024-05-01"], "error: --until 2024-05-01 is not"),
        (["--since", "2024-05-01", "--last", "1h"], "error: give --since or --last, not both"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "stream_rnn", "record", "--out", out, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not Path(out).exists()


# ------------------------------------------------------------------------------- writing
def test_write_atomic_writes_what_the_trainer_reads(tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    out.write_text("old\n")
    records = [Record("a", ["x", 7]), Record("b", ["y"], label="spam")]
    assert write_atomic(out, records) == 2
    assert read_records(out) == records
    assert out.read_text().splitlines()[1] == '{"key":"b","tokens":["y"],"label":"spam"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.jsonl"]  # no temp file left


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    out.write_text("old\n")
    broken = Record("a", ["x"])
    broken.tokens = [1.5]  # type: ignore[list-item]  # mutated after validation
    with pytest.raises(DataError, match="record 'a'"):
        write_atomic(out, [Record("ok", ["y"]), broken])
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.jsonl"]
    with pytest.raises(StreamError, match="does not exist; create it"):
        write_atomic(tmp_path / "missing" / "rec.jsonl", [])
    with pytest.raises(StreamError, match="is a directory"):
        write_atomic(tmp_path, [])


# ------------------------------------------------- the read loop, with a stand-in consumer
class FakeConsumer:
    """The few kafka-python consumer calls `record_topic` makes, over in-memory partitions.

    ``ends`` are the end offsets reported at start; records past them stand for what
    producers write while the recording runs, and must not be recorded.
    """

    def __init__(self, logs: dict[int, list[Fetched]], ends: dict[int, int], stuck: bool = False):
        self.logs, self.ends, self.stuck = logs, ends, stuck
        self.pos: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.logs) if topic == "t" else set()

    def topics(self) -> set[str]:
        return {"t", "__consumer_offsets"}

    def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp.partition][0].offset for tp in tps}

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp.partition] for tp in tps}

    def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        found = {}
        for tp, ms in query.items():
            hit = [r for r in self.logs[tp.partition] if r.timestamp >= ms]
            found[tp] = SimpleNamespace(offset=hit[0].offset) if hit else None
        return found

    def assign(self, tps: list[TopicPartition]) -> None:
        self.pos = dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos[tp] = offset

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Fetched]]:
        out = {}
        for tp, pos in self.pos.items():
            batch = [r for r in self.logs[tp.partition] if r.offset >= pos][:3]
            if batch and tp not in self.paused and not self.stuck:
                out[tp] = batch
                self.pos[tp] = batch[-1].offset + 1
        return out

    def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def close(self) -> None:
        self.closed = True


def _fake_log() -> dict[int, list[Fetched]]:
    # partition 0: "ab" end (ts 10-12), "cd" end (ts 20-22), then "zz" written after the start;
    # partition 1 (log start 5, after retention): "x" end (ts 11-12), "y" (ts 30), then "w".
    def at(p: int, o: int, ts: int, value: bytes) -> Fetched:
        return Fetched(p, o, b"k%d" % p, value, ts)

    def tok(t: str) -> bytes:
        return encode_event({"type": "token", "token": t})

    end = encode_event({"type": "end"})
    p0 = [at(0, 0, 10, tok("a")), at(0, 1, 11, tok("b")), at(0, 2, 12, end)]
    p0 += [at(0, 3, 20, tok("c")), at(0, 4, 21, tok("d")), at(0, 5, 22, end)]
    p0 += [at(0, 6, 40, tok("z")), at(0, 7, 41, tok("z")), at(0, 8, 42, end)]
    p1 = [at(1, 5, 11, tok("x")), at(1, 6, 12, end), at(1, 7, 30, tok("y")), at(1, 8, 50, tok("w"))]
    return {0: p0, 1: p1}


def _record(monkeypatch: pytest.MonkeyPatch, fake: FakeConsumer, **kw: Any) -> Recording:
    monkeypatch.setattr(record_mod, "open_consumer", lambda *a, **k: fake)
    return record_mod.record_topic("broker:9092", "t", **kw)


def test_the_read_stops_at_the_end_offsets_taken_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeConsumer(_fake_log(), ends={0: 6, 1: 8})
    calls: list[tuple[int, int]] = []
    rec = _record(monkeypatch, fake, progress=lambda done, total: calls.append((done, total)))
    ab, x, cd, y = (["a", "b"], ["x"], ["c", "d"], ["y"])
    assert _seqs(rec) == [("k0", ab, None), ("k1", x, None), ("k0", cd, None), ("k1", y, None)]
    assert fake.closed and fake.paused == set(fake.pos)
    assert [(p.partition, p.start, p.stop, p.first, p.last, p.read) for p in rec.partitions] == [
        (0, 0, 6, 0, 5, 6),
        (1, 5, 8, 5, 7, 3),
    ]
    assert calls[-1] == (9, 9) and all(total == 9 for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert "  partition 1: window [5, 8), 3 read (offsets 5..7)" in rec.summary()


def test_since_and_until_become_offsets_per_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeConsumer(_fake_log(), ends={0: 9, 1: 9})
    rec = _record(monkeypatch, fake, window=Window(since_ms=12, until_ms=41))
    # p0: [2, 7): the end of "ab", "cd", then "z"; p1: [6, 8): the end of "x", then "y"
    assert [(p.start, p.stop) for p in rec.partitions] == [(2, 7), (6, 8)]
    assert _seqs(rec) == [("k0", ["c", "d"], None), ("k1", ["y"], None), ("k0", ["z"], None)]
    assert rec.too_short == 2 and rec.cut == 0  # the cut heads held no token
    fresh = FakeConsumer(_fake_log(), ends={0: 9, 1: 9})
    late = _record(monkeypatch, fresh, window=Window(since_ms=21))
    assert _seqs(late) == [("k0", ["d"], None), ("k1", ["y", "w"], None), ("k0", ["z", "z"], None)]
    assert late.cut == 2  # both partitions start mid-log, so both keys' first sequences may
    fresh = FakeConsumer(_fake_log(), ends={0: 9, 1: 9})
    future = _record(monkeypatch, fresh, window=Window(since_ms=10_000))
    assert future.records == [] and [(p.start, p.stop) for p in future.partitions] == [(9, 9)] * 2


def test_a_missing_topic_and_a_stalled_read_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(record_mod, "open_consumer", lambda *a, **k: FakeConsumer({}, {}))
    with pytest.raises(
        StreamError, match=r"topic 'nope' does not exist at b:1 \(topics there: t\)"
    ):
        record_mod.record_topic("b:1", "nope")
    stuck = FakeConsumer(_fake_log(), ends={0: 6, 1: 8}, stuck=True)
    with pytest.raises(StreamError, match="partition 0 of 't' made no progress for 0s at offset 0"):
        _record(monkeypatch, stuck, stall_timeout_s=0.2)
    assert stuck.closed


def test_chunks_are_recorded_as_their_tokens_in_order() -> None:
    log = Log().tokens("k", "ab").event("k", type="tokens", tokens=["c", 7, "d"])
    log.event("j", type="tokens", tokens=["x"]).tokens("k", "e").end("k").end("j")
    log.raw(b"k", encode_event({"type": "tokens", "tokens": ["z"] * 300}, max_tokens=300))
    rec = reassemble(log.records)
    assert _seqs(rec) == [("k", ["a", "b", "c", 7, "d", "e"], None), ("j", ["x"], None)]
    assert rec.malformed == {"oversized": 1}  # over the workers' default max_chunk_tokens
    assert not reassemble(log.records, max_tokens=300).malformed
