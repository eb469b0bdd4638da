"""Checkpoint overhead: one worker draining a backlog with durable checkpoints on vs off.

Not a test (run it by hand; it prints a table). For each run: fresh topics, a backlog of
``--tokens`` random tokens over ``--keys`` keys produced first (before the worker starts: a
worker running while the backlog is produced keeps up with the producer and the drain would
measure the producer), then one ``stream-rnn worker`` that drains it, polled through its status
endpoint. The rate is tokens / (time of the last token - time of the first), so start-up and
the group join are left out. Runs alternate
on/off so that drift of a shared machine hits both. "On" is the default setting (a checkpoint
every 2 s or 50,000 tokens, offsets committed after it); "off" is
``STREAM_RNN_CHECKPOINT_INTERVAL_S=0`` (offsets committed once the outputs are on the broker).

Usage::

    .venv/bin/python tests/chaos/checkpoint_overhead.py                 # own broker, temp dir
    .venv/bin/python tests/chaos/checkpoint_overhead.py --bootstrap 127.0.0.1:9092 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # chaos_harness, stream_harness

from chaos_harness import ALPHABET, produce, tiny_model  # noqa: E402
from stream_harness import StreamTopics, WorkerProcess  # noqa: E402

from stream_rnn.ops.kafka_local import LocalKafka  # noqa: E402
from stream_rnn.ops.processes import find_free_port  # noqa: E402
from stream_rnn.ops.settings import Settings  # noqa: E402
from stream_rnn.stream.topics import ensure_topics  # noqa: E402

POLL_S = 0.05


def drain(
    bootstrap: str, model_dir: Path, workdir: Path, *, checkpoints: bool, tokens: int, keys: int
) -> dict[str, Any]:
    """Produce the backlog on fresh topics, drain it with one worker; its numbers."""
    tag = secrets.token_hex(3)
    topics = StreamTopics(f"ovh-tok-{tag}", f"ovh-pred-{tag}", f"ovh-dead-{tag}", 4)
    rng = random.Random(1)
    names = [f"key-{i:06d}" for i in range(keys)]
    argv = ["--model", str(model_dir), "--bootstrap", bootstrap, "--group", f"ovh-{tag}"]
    # at-least-once: checkpoints are its own (exactly-once writes states in every transaction)
    argv += [*topics.worker_args(), "--max-batch", "1024", "--guarantee", "at-least-once"]
    env = {
        "STREAM_RNN_WORKER_DIR": str(workdir / "workers"),
        "OMP_NUM_THREADS": "1",
        "STREAM_RNN_CHECKPOINT_INTERVAL_S": "2" if checkpoints else "0",
    }
    settings = Settings(
        tokens_topic=topics.tokens,
        predictions_topic=topics.predictions,
        dead_letter_topic=topics.dead_letters,
    )
    ensure_topics(bootstrap, settings, partitions=topics.partitions)
    produce(
        bootstrap, topics.tokens, ((rng.choice(names), rng.choice(ALPHABET)) for _ in range(tokens))
    )
    worker = WorkerProcess(argv, find_free_port(), workdir / f"worker-{tag}.log", env)
    try:
        worker.wait_until(lambda s: len(s["assigned"]) == 4, "partitions assigned", 120)
        first = last = None
        deadline = time.monotonic() + 600
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = worker.status() or status
            now = time.monotonic()
            if first is None and status.get("tokens", 0) > 0:
                first = (now, status["tokens"])
            if status.get("tokens", 0) >= tokens:
                last = (now, status["tokens"])
                break
            time.sleep(POLL_S)
        if first is None or last is None:
            raise RuntimeError(f"the worker did not drain {tokens} tokens:\n{worker.log_tail()}")
        rate = (last[1] - first[1]) / max(last[0] - first[0], 1e-9)
        return {
            "checkpoints": status["checkpoints"],
            "records": status["checkpoint_records"],
            "checkpoint_s": status["checkpoint_seconds"],
            "busy_s": status["busy_s"],
            "rate": rate,
        }
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start one)")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-overhead-") as tmp:
        workdir = Path(tmp)
        kafka = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            kafka = LocalKafka(workdir / "kafka")
            bootstrap = kafka.start().bootstrap
        try:
            model_dir = tiny_model(workdir)
            runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            for i in range(args.repeats):
                for on in (True, False) if i % 2 == 0 else (False, True):
                    r = drain(
                        bootstrap, model_dir, workdir, checkpoints=on, tokens=args.tokens,
                        keys=args.keys,
                    )  # fmt: skip
                    runs[on].append(r)
                    print(
                        f"checkpoints {'on ' if on else 'off'}: {r['rate']:8.0f} tokens/s, "
                        f"{r['checkpoints']} checkpoints of {r['records']} states in all "
                        f"({r['checkpoint_s']:.2f}s), engine busy {r['busy_s']:.2f}s",
                        flush=True,
                    )
            on_rate = statistics.median(r["rate"] for r in runs[True])
            off_rate = statistics.median(r["rate"] for r in runs[False])
            print(
                f"\n{args.tokens} tokens over {args.keys} keys, GRU 1x16, 1 worker, "
                f"{os.cpu_count()} cores: median {on_rate:.0f} tokens/s with checkpoints, "
                f"{off_rate:.0f} without: ratio on/off {on_rate / off_rate:.2f}"
            )
        finally:
            if kafka is not None:
                kafka.stop()


if __name__ == "__main__":
    main()
