"""`stream-rnn record` against the real broker: windows, transactions, and the trainer reading it.

Events are written by hand with ``json.dumps`` through kafka-python (not our codec or producer
library), plainly and in Kafka transactions, one of them aborted; record timestamps are set
explicitly so that ``--since``/``--last``/``--until`` cut the log at known places.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka_fixtures import TopicFactory
from stream_harness import REPO, run_cli

from stream_rnn.ops.processes import find_free_port
from stream_rnn.train.data import read_records

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
HOUR_MS = 3_600_000


def _token(token: str | int) -> bytes:
    return json.dumps({"v": 1, "type": "token", "token": token}).encode()


END = json.dumps({"v": 1, "type": "end"}).encode()


def _send_sequence(
    producer: KafkaProducer,
    topic: str,
    key: str,
    tokens: Sequence[str | int],
    ts_ms: int | None = None,
    *,
    end: bool = True,
) -> None:
    for t in tokens:
        producer.send(topic, key=key.encode(), value=_token(t), timestamp_ms=ts_ms)
    if end:
        producer.send(topic, key=key.encode(), value=END, timestamp_ms=ts_ms)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()


def _sequences(path: Path) -> set[tuple[str, tuple[str | int, ...]]]:
    return {(r.key, tuple(r.tokens or ())) for r in read_records(path)}


def _fails(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rnn", "record", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_record_windows_transactions_and_training(
    tmp_path: Path, kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("tokens", partitions=3)
    now_ms = int(time.time() * 1000)
    old, mid = now_ms - 3 * HOUR_MS, now_ms - HOUR_MS
    plain = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
    # three hours ago: six sequences, a garbage message, and one sequence still open
    for i in range(6):
        _send_sequence(plain, topic, f"u{i}", "abc", old)
    plain.send(topic, key=b"u0", value=b"{not json", timestamp_ms=old)
    _send_sequence(plain, topic, "span", "xy", old, end=False)
    plain.flush()
    # an hour ago: the open sequence ends, four more sequences
    _send_sequence(plain, topic, "span", "z", mid)
    for i in range(4):
        _send_sequence(plain, topic, f"v{i}", "de", mid)
    plain.flush()
    txn = KafkaProducer(bootstrap_servers=kafka_broker, transactional_id=f"{topic}-txn")
    txn.init_transactions()
    txn.begin_transaction()
    _send_sequence(txn, topic, "t-bad", "bad", mid)  # aborted: never to be recorded
    txn.flush()
    txn.abort_transaction()
    txn.begin_transaction()
    _send_sequence(txn, topic, "t-ok", "ok", mid)
    txn.commit_transaction()
    txn.close()
    # now: an id token and a sequence with no end yet
    _send_sequence(plain, topic, "ids", [5, 6], now_ms)
    _send_sequence(plain, topic, "open", "q", now_ms, end=False)
    plain.flush()

    # the aborted records are in the log (a read_uncommitted reader sees them) ...
    peek = KafkaConsumer(bootstrap_servers=kafka_broker, group_id=None)
    tps = [TopicPartition(topic, p) for p in range(3)]
    peek.assign(tps)
    peek.seek_to_beginning(*tps)
    partition_of: dict[str, int] = {}
    for _ in range(20):
        for batch in peek.poll(timeout_ms=200).values():
            partition_of.update((r.key.decode(), r.partition) for r in batch)
    peek.close()
    assert "t-bad" in partition_of

    # ... but the whole topic, read_committed, holds none of them
    common = ("--bootstrap", kafka_broker, "--topic", topic)
    everything = tmp_path / "all.jsonl"
    out = run_cli("record", "--out", str(everything), *common)
    abc, de = ("a", "b", "c"), ("d", "e")
    assert _sequences(everything) == {
        *((f"u{i}", abc) for i in range(6)),
        ("span", ("x", "y", "z")),
        *((f"v{i}", de) for i in range(4)),
        ("t-ok", ("o", "k")),
        ("ids", (5, 6)),
        ("open", ("q",)),
    }
    assert "recorded 14 sequences (34 tokens, 14 keys)" in out
    assert (
        "malformed: 1 (not_json 1)" in out and "open sequences at the end of the window: 1" in out
    )
    assert out.count("  partition ") == 3 and "may have begun" not in out

    # --last 2h: from an hour ago on; span's sequence began before and starts at "z"
    recent = tmp_path / "recent.jsonl"
    out = run_cli("record", "--out", str(recent), "--last", "2h", "--open", "drop", *common)
    assert _sequences(recent) == {
        ("span", ("z",)),
        *((f"v{i}", de) for i in range(4)),
        ("t-ok", ("o", "k")),
        ("ids", (5, 6)),
    }
    # Each key's first sequence on a partition whose window starts mid-log may have begun
    # earlier; the recorder cannot know which did (span's did), so it counts them all.
    cut = {partition_of[k] for k in ("span", *(f"u{i}" for i in range(6)))}
    maybe = sum(partition_of[key] in cut for key, _ in _sequences(recent))
    assert partition_of["span"] in cut and maybe >= 1
    assert f"{maybe} sequences may have begun before the window start" in out
    assert "1, dropped (--open drop)" in out and "malformed: 0" in out

    # --since/--until: only three hours ago; span is open at the window's end
    early = tmp_path / "early.jsonl"
    window = ("--since", _iso(old - 60_000), "--until", _iso(mid - 60_000))
    out = run_cli("record", "--out", str(early), *window, "--min-tokens", "3", *common)
    assert _sequences(early) == {*((f"u{i}", abc) for i in range(6))}
    assert "dropped: 1 shorter than --min-tokens 3" in out  # span: x, y
    assert "malformed: 1 (not_json 1)" in out
    until_only = tmp_path / "until.jsonl"
    run_cli("record", "--out", str(until_only), "--until", _iso(old + 60_000), *common)
    assert len(read_records(until_only)) == 7  # the six sequences and span's open head

    # the recording is training data: one epoch of a tiny model
    model = tmp_path / "model"
    out = run_cli(
        "train", "--data", str(everything), "--valid", str(everything), "--epochs", "1",
        "--hidden", "8", "--embed", "4", "--batch-size", "4", "--out", str(model),
    )  # fmt: skip
    assert "training next-token gru 1x8 on 14 sequences" in out and "best epoch 1" in out
    assert (model / "manifest.json").is_file() and (model / "weights.safetensors").is_file()


def test_record_ends_while_producers_keep_writing(
    tmp_path: Path, kafka_broker: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("tokens", partitions=2)
    producer = KafkaProducer(bootstrap_servers=kafka_broker, linger_ms=5)
    for i in range(50):
        producer.send(topic, key=f"k{i}".encode(), value=_token("a"))
        producer.send(topic, key=f"k{i}".encode(), value=END)
    producer.flush()
    stop = threading.Event()

    def flood() -> None:
        n = 0
        while not stop.is_set():
            producer.send(topic, key=f"flood{n % 7}".encode(), value=_token("f"))
            n += 1
            time.sleep(0.002)  # two cores: leave some to the broker and the recorder
            if n % 100 == 0:
                producer.flush()

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    try:
        time.sleep(1.0)
        out_path = tmp_path / "live.jsonl"
        started = time.monotonic()
        args = ("--out", str(out_path), "--bootstrap", kafka_broker, "--topic", topic)
        out = run_cli("record", *args, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        writer.join(10)
        producer.close()
    records = read_records(out_path)
    assert {(f"k{i}", ("a",)) for i in range(50)} <= {
        (r.key, tuple(r.tokens or ())) for r in records
    }
    flooded = [r for r in records if r.key.startswith("flood")]
    assert flooded and all(set(r.tokens or ()) == {"f"} for r in flooded), out
    assert elapsed < 60


def test_user_errors_are_one_line(tmp_path: Path, kafka_broker: str) -> None:
    out = str(tmp_path / "r.jsonl")
    missing = _fails("--out", out, "--bootstrap", kafka_broker, "--topic", "no-such-topic")
    assert missing.startswith("error: topic 'no-such-topic' does not exist at ")
    assert "pass --topic NAME" in missing
    nowhere = f"127.0.0.1:{find_free_port()}"
    unreachable = _fails("--out", out, "--bootstrap", nowhere)
    assert unreachable.startswith(f"error: cannot reach Kafka at {nowhere}")
    assert "--bootstrap HOST:PORT" in unreachable
    assert not Path(out).exists()
