"""The streaming stage of ``stream-rnn demo``: the whole path through a real local Kafka broker.

Starts a broker (KRaft, 127.0.0.1) in the demo's directory, runs one ``stream-rnn worker`` with
the demo's classifier, pushes the held-out sequences as interleaved token events, collects the
predictions and compares them line by line with offline scoring.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import (
    ProcessExitedError,
    ProcessWaitTimeout,
    WorkerHandle,
    find_free_port,
)
from stream_rnn.ops.settings import Settings
from stream_rnn.producer import TokenProducer, produce_records
from stream_rnn.stream.collect import read_predictions, to_lines
from stream_rnn.stream.topics import ensure_topics
from stream_rnn.train.data import Record

WORKER_START_TIMEOUT_S = 120.0


def stream_through_kafka(
    console: Console,
    model_dir: Path,
    records: list[Record],
    offline: list[dict[str, Any]],
    work_dir: Path,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the records through broker + worker; returns agreement and latency figures."""
    kafka = LocalKafka(work_dir / "kafka")
    info = kafka.start()
    console.print(
        f"   Kafka {kafka.version} broker at {info.bootstrap} (data in {work_dir / 'kafka'})"
    )
    run = f"demo-{int(time.time())}"
    topics = {"tokens": f"{run}.tokens", "predictions": f"{run}.predictions", "dead": f"{run}.dead"}
    # create the topics up front so the collector can subscribe before the worker is up
    ensure_topics(
        info.bootstrap,
        Settings(
            tokens_topic=topics["tokens"],
            predictions_topic=topics["predictions"],
            dead_letter_topic=topics["dead"],
        ),
        partitions=2,
    )
    log_path = work_dir / f"{run}-worker.log"
    args = [
        "--model",
        str(model_dir),
        "--bootstrap",
        info.bootstrap,
        "--group",
        run,
        "--topic",
        topics["tokens"],
        "--predictions-topic",
        topics["predictions"],
        "--dead-letter-topic",
        topics["dead"],
        "--partitions",
        "2",
    ]
    env = {"STREAM_RNN_WORKER_DIR": str(work_dir / "worker")}
    worker = WorkerHandle(args, find_free_port(), log_path, env=env)
    try:
        _wait_assigned(worker)
        started = time.monotonic()
        with TokenProducer(info.bootstrap, topics["tokens"]) as producer:
            sent = produce_records(records, producer, interleave_seed=seed)
        console.print(
            f"   worker pid {worker.pid}; produced {sent} events ({len(records)} sequences, interleaved)"
        )
        want = len(records)

        def done(preds: list[dict[str, Any]]) -> bool:
            return sum(p["type"] == "label" for p in preds) >= want

        preds = read_predictions(
            info.bootstrap,
            topics["predictions"],
            timeout_s=WORKER_START_TIMEOUT_S,
            max_wait_s=WORKER_START_TIMEOUT_S,
            until=done,
        )
        elapsed = time.monotonic() - started
        if not worker.alive():
            raise RuntimeError(f"the worker exited early; see {log_path}")
        lines = {line["key"]: line for line in to_lines(preds, "classify")}
        same = sum(lines.get(o["key"], {}).get("label") == o["label"] for o in offline)
        diff = max(
            (
                abs(lines[o["key"]]["probs"][k] - p)
                for o in offline
                if o["key"] in lines
                for k, p in o["probs"].items()
            ),
            default=float("nan"),
        )
        latencies = sorted(p["latency_s"] for p in preds if p.get("latency_s") is not None)
        return {
            "sequences": want,
            "streamed": len(lines),
            "same_label": same,
            "max_prob_diff": diff,
            "latency_p50_s": statistics.median(latencies) if latencies else float("nan"),
            "latency_p99_s": latencies[int(0.99 * (len(latencies) - 1))]
            if latencies
            else float("nan"),
            "seconds": elapsed,
            "worker_log": str(log_path),
        }
    finally:
        worker.stop(timeout=30)
        kafka.stop()


def _wait_assigned(worker: WorkerHandle) -> None:
    """Poll the worker's status endpoint until it owns partitions (bounded)."""
    try:
        worker.wait_until(
            lambda status: bool(status.get("assigned")), "partitions", WORKER_START_TIMEOUT_S
        )
    except ProcessExitedError as err:
        raise RuntimeError(f"the worker exited ({err.returncode}); see {worker.log_path}") from None
    except ProcessWaitTimeout:
        raise RuntimeError(
            f"the worker got no partitions in {WORKER_START_TIMEOUT_S:.0f}s; see {worker.log_path}"
        ) from None
