"""``stream-rnn replay --to kafka`` through a live worker equals the in-process replay.

One event log (interleaved sequences with recorded times, plus malformed messages) is replayed
at its timing into a worker's tokens topic and, separately, in process; both give the same
`score` lines, the same dead letters by reason, and every check of the report passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from stream_harness import (
    StreamTopicsFactory,
    WorkerFactory,
    assert_same_top_k,
    make_model,
    run_cli,
)

from stream_rnn.train.data import records_to_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
BAD = [
    ("bad-1", '{"v":1,"type":"token","token":"a"', "not_json"),
    (None, '{"v":1,"type":"token","token":"a"}', "missing_key"),
    ("bad-2", '{"v":1,"type":"token","token":true}', "wrong_type"),
    ("bad-3", '{"v":1,"type":"end"}', "unknown_key"),
]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_kafka_replay_equals_the_inproc_replay(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
) -> None:
    model_dir, _, records = make_model(tmp_path, "next-token", 24)
    rows: list[dict[str, Any]] = records_to_events(records, interleave_seed=3, with_ts=True)
    for n, (key, raw, reason) in enumerate(BAD):  # spread over the log
        rows.insert(
            (n + 1) * len(rows) // (len(BAD) + 1), {"key": key, "raw": raw, "expect": reason}
        )
    log = tmp_path / "replay.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))

    topics = stream_topics(partitions=2)
    worker = worker_factory(model_dir, *topics.worker_args(), "--max-batch", "64")
    worker.wait_until(lambda s: len(s["assigned"]) == 2, "both partitions assigned")
    kafka_out, kafka_report = tmp_path / "kafka.jsonl", tmp_path / "report-kafka"
    output = run_cli(
        "replay", "--data", str(log), "--model", str(model_dir), "--to", "kafka",
        "--bootstrap", kafka_broker, "--topic", topics.tokens,
        "--predictions-topic", topics.predictions, "--dead-letter-topic", topics.dead_letters,
        "--speed", "2", "--timeout", "30", "--out", str(kafka_out), "--report", str(kafka_report),
    )  # fmt: skip
    assert "every message answered exactly once" in output
    inproc_out = tmp_path / "inproc.jsonl"
    run_cli("replay", "--data", str(log), "--model", str(model_dir), "--max",
            "--out", str(inproc_out))  # fmt: skip

    streamed, local = _lines(kafka_out), _lines(inproc_out)
    assert len(streamed) == len(local) == len(records)
    for got, want in zip(streamed, local, strict=True):
        assert got["key"] == want["key"] and got["model_version"] == want["model_version"]
        for a, b in zip(got["next"], want["next"], strict=True):
            assert_same_top_k(a, b, want["key"])
    report = (kafka_report / "report.md").read_text()
    assert "## Guarantee checks: all passed" in report
    for _, _, reason in BAD:
        assert f"| {reason} | 1 | 1 |" in report
    assert "| duplicates | 0 |" in report
    assert (kafka_report / "latency_cdf.png").stat().st_size > 10_000
    status = worker.status()
    assert status is not None and sum(status["dead_letters"].values()) == len(BAD)
