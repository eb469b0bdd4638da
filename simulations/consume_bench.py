"""faust's consume path, stock vs bulk, against an aiokafka pass-through pipe, in one run.

One local broker (``LocalKafka`` in a temporary directory, or ``--bootstrap``) and one backlog
of ``--messages`` token events (~60 bytes, JSON, keys spread over ``--keys`` keys) on a topic
of ``--partitions`` partitions serve every row:

* stock — an empty faust agent, the worker's shape (raw key and value, faust acks off, the
  channel queue of ``stream_buffer_maxsize`` 4096, micro-batches with
  ``take_batches(queue, 1024, 0.05)``, doing nothing with them), on faust's own consumer: one
  ``wait_first(callback(message), suspend_flow.wait())`` per message;
* bulk  — the same agent with ``use_bulk_consumer`` (stream/faust_boundary.py): fetched record
  batches go to the agent's queue in chunks;
* pipe  — the honest per-message reference: one process, aiokafka consumer (``getmany``) ->
  msgspec decode of every value -> one produced message of ~200 bytes per input (acks=all,
  ``send`` per message, futures gathered per fetch), timed from the first record fetched to
  the last acknowledgement.

The faust rows run in their own process (``--agent``, started by this script with a fresh
consumer group), which times itself from its first to its ``--messages``-th message. Every row
also reports CPU microseconds per message (``time.process_time``: all threads of its process).
Rows alternate over ``--repeat`` rounds; the table shows each row's median, and the ratios
bulk/stock, bulk/pipe and stock/pipe.

Run: ``.venv/bin/python simulations/consume_bench.py [--messages N] [--partitions 4]
[--repeat 3] [--bootstrap HOST:PORT] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import signal
import statistics
import subprocess  # noqa: S404 - this script's own agent, argument lists
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from stream_rnn.ops.kafka_local import LocalKafka

AGENT_TIMEOUT_S = 300.0
ROWS = ("stock", "bulk", "pipe")


class Token(msgspec.Struct):
    """The token event as the pipe decodes it (the worker's wire format)."""

    v: int
    type: str
    token: str | int
    ts: float | None = None


class Prediction(msgspec.Struct):
    """~200 bytes, the size of a next-token prediction."""

    v: int
    type: str
    id: str
    key: str
    model_version: str
    next: dict[str, list[Any]]
    ts: float


# ------------------------------------------------------------------------------ the backlog
def make_messages(n: int, keys: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    names = [f"user-{i}".encode() for i in range(keys)]
    now = time.time()
    encode = msgspec.json.encode
    return [
        (rng.choice(names), encode(Token(1, "token", f"t{rng.randrange(250)}", now)))
        for _ in range(n)
    ]


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="consume-bench")
    try:
        admin.create_topics([NewTopic(t, partitions, 1) for t in names], timeout_ms=20_000)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            described = admin.describe_topics(names)
            ready = [
                len(d.get("partitions", [])) == partitions
                and all(p.get("leader_id", p.get("leader", -1)) >= 0 for p in d["partitions"])
                for d in described
            ]
            if all(ready):
                return
            time.sleep(0.1)
        raise TimeoutError(f"topics {names} have no leaders")
    finally:
        admin.close()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(messages) / (time.perf_counter() - started)


# ---------------------------------------------------------------------------- the faust rows
def run_agent(args: argparse.Namespace) -> None:
    """``--agent``: the empty faust agent (stock or bulk) until SIGTERM; timing to a file."""
    import faust

    from stream_rnn.stream import faust_boundary as fb
    from stream_rnn.stream.batches import take_batches

    logging.basicConfig(level=logging.WARNING)
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        datadir=args.datadir,
        autodiscover=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        stream_buffer_maxsize=4096,
    )
    topic = app.topic(
        args.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        acks=False,
    )
    if args.agent == "bulk":
        fb.use_bulk_consumer(app, [args.topic])
    seen = {"count": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}

    @app.agent(topic, name="empty")
    async def empty(stream: Any) -> None:
        async for events in take_batches(fb.channel_queue(stream), 1024, 0.05):
            if not seen["count"]:
                seen["first"], seen["cpu_first"] = time.perf_counter(), time.process_time()
            seen["count"] += len(events)
            if seen["count"] >= args.expect and not seen["last"]:
                seen["last"], seen["cpu_last"] = time.perf_counter(), time.process_time()
                stats = fb.bulk_stats(app)
                report = {**seen, "consumer": stats.as_dict() if stats else None}
                Path(args.done_file).write_text(json.dumps(report))

    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


def measure_agent(path: str, bootstrap: str, topic: str, n: int, workdir: Path) -> dict[str, Any]:
    tag = f"{path}-{secrets.token_hex(3)}"
    done = workdir / f"{tag}.json"
    log = workdir / f"{tag}.log"
    argv = [sys.executable, __file__, "--agent", path, "--bootstrap", bootstrap,
            "--topic", topic, "--group", f"bench-{tag}", "--expect", str(n),
            "--done-file", str(done), "--datadir", str(workdir / tag)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    try:
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while not done.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the {path} agent did not drain {n} messages:\n{tail}")
            time.sleep(0.2)
        time.sleep(0.1)  # the file is written in one call; let it land
        seen = json.loads(done.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = max(seen["last"] - seen["first"], 1e-9)
    return {
        "messages": seen["count"],
        "seconds": seconds,
        "rate": seen["count"] / seconds,
        "cpu_us_per_message": 1e6 * (seen["cpu_last"] - seen["cpu_first"]) / seen["count"],
        "consumer": seen["consumer"],
    }


# ---------------------------------------------------------------------------------- the pipe
async def measure_pipe(
    bootstrap: str, topic: str, out_topic: str, n: int, partitions: int
) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await consumer.start()
    await producer.start()
    decode = msgspec.json.Decoder(Token).decode
    encode = msgspec.json.Encoder().encode
    send = producer.send
    tokens = [f"t{i}" for i in range(5)]
    probs = [0.31, 0.22, 0.17, 0.09, 0.05]
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        first = cpu_first = 0.0
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipe passed {seen} of {n} messages")
            fetched = await consumer.getmany(timeout_ms=200)
            futures = []
            for records in fetched.values():
                if not first:
                    first, cpu_first = time.perf_counter(), time.process_time()
                for r in records:
                    token = decode(r.value)
                    key = r.key.decode()
                    pred = Prediction(1, "next", f"{r.partition}:{r.offset}", key, "bench-v1",
                                      {"tokens": tokens, "probs": probs, "after": [token.token]},
                                      time.time())  # fmt: skip
                    futures.append(await send(out_topic, encode(pred), key=r.key))
                seen += len(records)
            await asyncio.gather(*futures)
        seconds = max(time.perf_counter() - first, 1e-9)
        cpu = time.process_time() - cpu_first
        size = len(encode(Prediction(1, "next", "3:123456", "user-1234", "bench-v1",
                                     {"tokens": tokens, "probs": probs, "after": ["t17"]},
                                     time.time())))  # fmt: skip
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "messages": seen,
        "seconds": seconds,
        "rate": seen / seconds,
        "cpu_us_per_message": 1e6 * cpu / seen,
        "produced_bytes": size,
    }


# ----------------------------------------------------------------------------------- the run
@contextmanager
def broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    kafka = LocalKafka(workdir / "kafka")
    kafka.start()
    try:
        address = kafka.status().bootstrap
        assert address is not None
        yield address
    finally:
        kafka.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="consume-bench-") as tmp:
        workdir = Path(tmp)
        with broker(args.bootstrap, workdir) as bootstrap:
            name = f"consume-bench-{secrets.token_hex(3)}"
            topic, out_topic = f"{name}.tokens", f"{name}.predictions"
            create_topics(bootstrap, [topic, out_topic], args.partitions)
            messages = make_messages(args.messages, args.keys)
            produced = asyncio.run(produce(bootstrap, topic, messages))
            print(f"backlog: {len(messages)} messages on {args.partitions} partitions "
                  f"({produced:,.0f}/s produced)", flush=True)  # fmt: skip
            rounds: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
            for r in range(args.repeat):
                for row in ROWS:
                    if row == "pipe":
                        result = asyncio.run(
                            measure_pipe(
                                bootstrap, topic, out_topic, args.messages, args.partitions
                            )
                        )
                    else:
                        result = measure_agent(row, bootstrap, topic, args.messages, workdir)
                    rounds[row].append(result)
                    print(f"round {r + 1} {row:>5}: {result['rate']:>9,.0f} msg/s "
                          f"{result['cpu_us_per_message']:6.1f} us CPU/msg", flush=True)  # fmt: skip
    summary = {
        row: {
            "rate": statistics.median(x["rate"] for x in runs),
            "cpu_us_per_message": statistics.median(x["cpu_us_per_message"] for x in runs),
        }
        for row, runs in rounds.items()
    }
    rate = {row: summary[row]["rate"] for row in ROWS}
    ratios = {
        "bulk/stock": rate["bulk"] / rate["stock"],
        "bulk/pipe": rate["bulk"] / rate["pipe"],
        "stock/pipe": rate["stock"] / rate["pipe"],
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "agent")},
        "rounds": rounds,
        "summary": summary,
        "ratios": ratios,
    }


def report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"consume path, {cfg['messages']:,} messages, {cfg['partitions']} partitions, "
        f"median of {cfg['repeat']} rounds",
        f"{'row':<7}{'msg/s':>12}{'us CPU/msg':>12}",
    ]
    for row, s in results["summary"].items():
        lines.append(f"{row:<7}{s['rate']:>12,.0f}{s['cpu_us_per_message']:>12.1f}")
    lines += [f"{name:<12}{value:>7.2f}" for name, value in results["ratios"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bootstrap", default=None, help="an existing broker (default: own)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    # the faust agent process (started by this script)
    parser.add_argument("--agent", choices=("stock", "bulk"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--topic", default="", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--done-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--datadir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        run_agent(args)
        return
    results = run(args)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
