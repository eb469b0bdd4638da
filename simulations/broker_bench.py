"""One stream worker through a real local Kafka broker, against references, in one run.

Setup (issue 3, section 6): GRU 2 layers x 128, vocabulary 256, ~10,000 keys, tokens spread at
random over the keys, a tokens topic of 4 partitions, CPU; random weights saved with
``save_checkpoint``. One broker (``LocalKafka`` in a temporary directory) serves every row:

* worker   — one ``stream-rnn worker`` process drains a pre-produced backlog of ``--tokens``
             token events (the sustained maximum): rate = tokens / (last prediction's ``ts`` -
             first prediction's ``ts``), read back from the predictions topic;
* queue    — faust alone: an agent taking micro-batches from its channel queue with
             ``take_batches`` exactly as the worker does, but doing nothing with them
             (``faust_naive_agent.py --mode empty-queue``): the most one faust worker can drain;
* take     — the same with faust's ``take_events(max_batch, max_wait)`` (``--mode empty-take``);
* events   — faust alone, one event at a time, doing nothing (``--mode empty-events``);
* ceiling  — a plain aiokafka consumer in this process: ``getmany`` batches, ``decode_batch``
             and ``decode_key`` on every message; no faust, no model;
* direct   — the worker's pipeline without faust, in this process: aiokafka ``getmany`` ->
             ``Adapter.process`` (decode, `Engine`, encode) on an engine thread -> `OutputSender`
             (no checkpoints, no offset commits): what the worker could reach without faust's
             per-message path;
* naive    — the usual hand-written faust agent (``faust_naive_agent.py --mode naive``): one
             event at a time, ``json``, states in a faust ``Table``, batch-1 network step, one
             ``send`` per prediction; timed like the worker, over ``--naive-tokens``;
* latency  — the same worker, caught up, fed at half its measured maximum for
             ``--latency-seconds`` by a paced producer in this process: ``latency_s`` that the
             worker writes (token ``ts`` -> prediction encoded) and end to end (token ``ts`` ->
             prediction received here), p50 / p99.

Run: ``.venv/bin/python simulations/broker_bench.py [--tokens N] [--naive-tokens N] [--keys N]
[--partitions N] [--latency-seconds S] [--worker-env K=V ...] [--out results.json]``.
``--sweep`` also drains the backlog once per worker setting in ``SWEEP`` (same broker, same
messages) and prints what each changed. Every row also reports the CPU time its process spent
per token (all threads, from /proc or ``time.process_time``): on a machine shared with other
work it moves much less than the rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import signal
import subprocess  # noqa: S404 - our own worker and agent, argument lists
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaConsumer
from kafka import TopicPartition as KTopicPartition

from stream_rnn.engine.engine import Engine
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.kafka_local import LocalKafka, find_free_port
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.checkpoint import load_checkpoint, save_checkpoint
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.stream.codec import decode_batch, decode_key, encode_event
from stream_rnn.stream.messages import TokenEvent
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.topics import TopicLayout, ensure_topics
from stream_rnn.train.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "simulations" / "faust_naive_agent.py"
POLL_S = 0.25
STOP_TIMEOUT_S = 30.0
# Every process this benchmark starts gets these unless --worker-env says otherwise: the broker
# and the benchmark share the machine's two cores with the process under test.
BASE_ENV = {"OMP_NUM_THREADS": "1"}
# --sweep: one backlog drain per entry, (label, extra environment, extra worker flags); each is
# a change from the default run (BASE_ENV and the worker's defaults). Faust reads its settings
# from the environment too (and lets it override the app's arguments), so these need no code.
SWEEP: list[tuple[str, dict[str, str], list[str]]] = [
    ("defaults (OMP_NUM_THREADS=1)", {}, []),
    ("torch threads = cores (OMP unset)", {"OMP_NUM_THREADS": ""}, []),
    ("STREAM_RNN_CHECKPOINT_INTERVAL_S=0 (off)", {"STREAM_RNN_CHECKPOINT_INTERVAL_S": "0"}, []),
    ("CYTHON_OPTIMIZATIONS=1", {"CYTHON_OPTIMIZATIONS": "1"}, []),
    ("NO_CYTHON=1", {"NO_CYTHON": "1"}, []),
    ("STREAM_BUFFER_MAXSIZE=16384", {"STREAM_BUFFER_MAXSIZE": "16384"}, []),
    ("BROKER_MAX_POLL_RECORDS=4096", {"BROKER_MAX_POLL_RECORDS": "4096"}, []),
    ("CONSUMER_MAX_FETCH_SIZE=4MiB", {"CONSUMER_MAX_FETCH_SIZE": str(4 << 20)}, []),
    ("--max-batch 4096", {}, ["--max-batch", "4096"]),
    ("--max-batch 256", {}, ["--max-batch", "256"]),
]


@dataclass
class BenchConfig:
    """Sizes of one run; the defaults take about 4 minutes on 2 shared cores."""

    tokens: int = 200_000
    naive_tokens: int = 15_000
    keys: int = 10_000
    partitions: int = 4
    latency_seconds: float = 25.0
    latency_rate: float | None = None  # tokens/s; None: half the worker's measured maximum
    layers: int = 2
    hidden: int = 128
    embed: int = 64
    vocab: int = 256
    max_batch: int = 1024
    max_wait: float = 0.05
    worker_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    faust_refs: bool = True  # the two empty faust agents
    direct: bool = True  # the faust-less pipeline in this process
    sweep: bool = False
    seed: int = 0
    drain_timeout_s: float = 300.0


# ------------------------------------------------------------------------------- set-up
def build_model(out: Path, cfg: BenchConfig) -> Path:
    """A random-weight next-token GRU checkpoint with a token vocabulary ``t0``, ``t1``, ..."""
    torch.manual_seed(cfg.seed)
    vocab = Vocab.from_tokens([f"t{i}" for i in range(cfg.vocab - 4)], "token")
    config = ModelConfig(
        task="next-token",
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=cfg.embed,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
    )
    save_checkpoint(out, RecurrentModel(config).eval(), vocab=vocab.to_dict())
    return out


def make_messages(
    n: int, keys: int, vocab: int, rng: random.Random, ts: float | None = None
) -> list[tuple[bytes, bytes]]:
    """``n`` token events (key, wire value) spread at random over ``keys`` keys."""
    names = [f"user-{i}".encode() for i in range(keys)]
    when = time.time() if ts is None else ts
    return [
        (rng.choice(names), encode_event(TokenEvent(f"t{rng.randrange(vocab - 4)}", when)))
        for _ in range(n)
    ]


def fresh_outputs(bootstrap: str, layout: TopicLayout) -> TopicLayout:
    """``layout`` with new (empty) predictions and dead-letter topics, created."""
    name = f"{layout.tokens}-{secrets.token_hex(3)}"
    settings = Settings(
        tokens_topic=layout.tokens,
        predictions_topic=f"{name}.predictions",
        dead_letter_topic=f"{name}.dead-letters",
    )
    return ensure_topics(bootstrap, settings, partitions=layout.partitions)


def stream_topics(bootstrap: str, prefix: str, partitions: int) -> TopicLayout:
    """Fresh tokens / -state / predictions / dead-letter topics named ``<prefix>-<random>``."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    settings = Settings(
        tokens_topic=f"{name}.tokens",
        predictions_topic=f"{name}.predictions",
        dead_letter_topic=f"{name}.dead-letters",
    )
    return ensure_topics(bootstrap, settings, partitions=partitions)


async def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> float:
    """Send ``messages`` as partition batches (murmur2, acks=all); returns messages/s."""
    sender = OutputSender(bootstrap, client_id="broker-bench-producer")
    await sender.start()
    started = time.perf_counter()
    try:
        futures = []
        for i in range(0, len(messages), 20_000):
            futures += await sender.send(topic, messages[i : i + 20_000])
        await asyncio.gather(*futures)
    finally:
        await sender.stop()
    return len(messages) / (time.perf_counter() - started)


# ------------------------------------------------------------------------------- processes
class Proc:
    """A subprocess with its output in a log file; `stop` is SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        full_env = {**os.environ, **BASE_ENV, **env}
        full_env = {k: v for k, v in full_env.items() if v != ""}  # "" unsets
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - argument list
                argv, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.log.stem} exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
            )

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads), from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_worker(
    bootstrap: str,
    model_dir: Path,
    layout: TopicLayout,
    cfg: BenchConfig,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> tuple[Proc, int]:
    """A ``stream-rnn worker`` process on ``layout`` (its own group); returns it and its port."""
    port = find_free_port()
    argv = [
        sys.executable, "-m", "stream_rnn", "worker", "--model", str(model_dir),
        "--bootstrap", bootstrap, "--group", f"bench-{secrets.token_hex(3)}",
        "--topic", layout.tokens, "--predictions-topic", layout.predictions,
        "--dead-letter-topic", layout.dead_letters, "--partitions", str(layout.partitions),
        "--max-batch", str(cfg.max_batch), "--max-wait", str(cfg.max_wait),
        "--web-port", str(port), *cfg.worker_args, *args,
    ]  # fmt: skip
    worker_env = {
        "STREAM_RNN_WORKER_DIR": str(workdir / "workers"),
        **cfg.worker_env,
        **(env or {}),
    }
    log = workdir / f"worker-{port}.log"
    return Proc(argv, log, worker_env), port


def start_agent(
    mode: str,
    bootstrap: str,
    layout: TopicLayout,
    cfg: BenchConfig,
    workdir: Path,
    *,
    model_dir: Path | None = None,
    expect: int = 0,
) -> tuple[Proc, Path]:
    """``faust_naive_agent.py --mode MODE`` on ``layout``; returns it and its done file."""
    tag = f"{mode}-{secrets.token_hex(3)}"
    done = workdir / f"{tag}.done.json"
    argv = [
        sys.executable, str(AGENT), "--mode", mode, "--bootstrap", bootstrap,
        "--tokens-topic", layout.tokens, "--predictions-topic", layout.predictions,
        "--group", f"bench-{tag}", "--partitions", str(layout.partitions),
        "--datadir", str(workdir / tag), "--expect", str(expect), "--done-file", str(done),
        "--max-batch", str(cfg.max_batch), "--max-wait", str(cfg.max_wait),
    ]  # fmt: skip
    if model_dir is not None:
        argv += ["--model", str(model_dir)]
    return Proc(argv, workdir / f"{tag}.log", cfg.worker_env), done


def status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:  # noqa: S310 - loopback
            loaded: dict[str, Any] = json.loads(resp.read())
            return loaded
    except OSError:
        return None


def wait_for(
    pred: Callable[[], bool], proc: Proc, what: str, timeout_s: float, poll_s: float = POLL_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        proc.check_alive(what)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f}s:\n{proc.tail()}")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------- measuring
class Offsets:
    """End offsets and first/last records of a topic's partitions (kafka-python, no group).

    read_committed: under exactly-once the last offsets of a partition are transaction markers
    (not records) and open transactions are not visible yet.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.tps = [KTopicPartition(topic, p) for p in range(partitions)]
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )

    def total(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def span(self, field_name: str = "ts") -> tuple[float, float, int]:
        """Smallest ``field_name`` of the partitions' first records, largest of their last
        (as the end offsets are now), and how many records that spans."""
        ends = self.consumer.end_offsets(self.tps)
        firsts, lasts = [], []
        for tp in self.tps:
            if not ends[tp]:
                continue
            firsts.append(json.loads(self._records_from(tp, 0, ends[tp])[0])[field_name])
            # the last record is among the last offsets (markers take some under transactions)
            tail = self._records_from(tp, max(0, ends[tp] - 64), ends[tp], all_of_them=True)
            lasts.append(max(json.loads(v)[field_name] for v in tail))
        return min(firsts), max(lasts), sum(ends.values())

    def _records_from(
        self, tp: KTopicPartition, offset: int, end: int, *, all_of_them: bool = False
    ) -> list[bytes]:
        self.consumer.assign([tp])
        self.consumer.seek(tp, offset)
        values: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.consumer.position(tp) < end:
            for records in self.consumer.poll(timeout_ms=500, max_records=64).values():
                values += [r.value for r in records]
            if values and not all_of_them:
                return values
        if not values:
            raise TimeoutError(f"could not read {tp.topic}:{tp.partition}@{offset}..{end}")
        return values

    def close(self) -> None:
        self.consumer.close()


def drain_rate(
    bootstrap: str,
    layout: TopicLayout,
    n: int,
    proc: Proc,
    timeout_s: float,
    port: int | None = None,
) -> dict[str, float]:
    """Wait for ``n`` predictions; tokens/s between the first and the last one (their ``ts``).

    With a worker's status ``port``, its own count of predictions says when (offsets count
    transaction markers too); the last transaction then commits within a commit interval.
    A worker that has more than ``n`` tokens to read may have written more by then: the rate
    counts every prediction up to the last one read.
    """
    offsets = Offsets(bootstrap, layout.predictions, layout.partitions)
    # (predictions, process CPU s) at the first poll that saw predictions, and at the last
    cpu: list[tuple[int, float]] = []

    def done() -> bool:
        if port is not None:
            total = int((status(port) or {}).get("predictions", 0))
        else:
            total = offsets.total()
        if total:
            cpu[1 if cpu else 0 :] = [(total, proc.cpu_seconds())]
        return total >= n

    try:
        wait_for(done, proc, f"{n} predictions", timeout_s)
        if port is not None:
            time.sleep(1.0)  # the last transaction commits (0.1 s by default)
        first, last, count = offsets.span("ts")
    finally:
        offsets.close()
    count = n if port is not None else count
    seconds = max(last - first, 1e-9)
    return {"tokens": count, "seconds": seconds, "rate": count / seconds, **_cpu(cpu)}


def _cpu(samples: list[tuple[int, float]]) -> dict[str, float]:
    """CPU microseconds per token of the process between two (count, CPU s) samples: unlike
    the rate, only a little inflated by other load on the machine."""
    (n0, c0), (n1, c1) = samples[0], samples[-1]
    if n1 <= n0:  # one poll saw everything (a tiny run): nothing to divide by
        return {"cpu_us_per_token": float("nan")}
    return {"cpu_us_per_token": (c1 - c0) / (n1 - n0) * 1e6}


def measure_worker(
    bootstrap: str,
    model_dir: Path,
    layout: TopicLayout,
    n: int,
    cfg: BenchConfig,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    keep: bool = False,
) -> tuple[dict[str, Any], Proc | None, int]:
    """Backlog drain of one worker over ``layout`` (which already holds ``n`` tokens, and
    whose state topic is empty).

    With ``keep`` the worker is left running (for the latency run) and returned.
    """
    proc, port = start_worker(bootstrap, model_dir, layout, cfg, workdir, env=env, args=args)
    try:
        result: dict[str, Any] = drain_rate(
            bootstrap, layout, n, proc, cfg.drain_timeout_s, port=port
        )
        result["status"] = status(port) or {}
        skipped = result["status"].get("skipped_redelivered", 0)
        if skipped:
            raise RuntimeError(
                f"the worker skipped {skipped} tokens as already in their keys' states: "
                f"{layout.tokens} was drained before; give every drain fresh topics"
            )
    except BaseException:
        proc.stop()
        raise
    if not keep:
        proc.stop()
        return result, None, port
    return result, proc, port


def measure_agent(
    mode: str,
    bootstrap: str,
    layout: TopicLayout,
    n: int,
    cfg: BenchConfig,
    workdir: Path,
    model_dir: Path | None = None,
) -> dict[str, float]:
    """Drain rate of one `faust_naive_agent.py` process over ``n`` pre-produced tokens."""
    proc, done = start_agent(mode, bootstrap, layout, cfg, workdir, model_dir=model_dir, expect=n)
    try:
        if mode == "naive":
            return drain_rate(bootstrap, layout, n, proc, cfg.drain_timeout_s)
        wait_for(done.exists, proc, f"{n} messages", cfg.drain_timeout_s)
        timing = json.loads(done.read_text())  # the agent times itself: wall and CPU clocks
        seconds = max(timing["last"] - timing["first"], 1e-9)
        cpu = [(0, timing["cpu_first"]), (n, timing["cpu_last"])]
        return {"tokens": n, "seconds": seconds, "rate": n / seconds, **_cpu(cpu)}
    finally:
        proc.stop()


async def consume_ceiling(bootstrap: str, layout: TopicLayout, n: int) -> dict[str, float]:
    """Read and decode ``n`` tokens with a plain aiokafka consumer: getmany, decode_batch."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(layout.tokens, p) for p in range(layout.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = rejected = 0
        first: float | None = None
        cpu_first = 0.0
        deadline = time.monotonic() + 120
        while seen < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                if first is None:
                    first, cpu_first = time.perf_counter(), time.process_time()
                keys = [decode_key(r.key) for r in records]
                decoded = decode_batch([r.value for r in records])
                rejected += sum(1 for d in decoded if not isinstance(d, TokenEvent))
                seen += len(keys)
        if first is None or seen < n:
            raise TimeoutError(f"the ceiling consumer read {seen} of {n} messages")
        seconds = max(time.perf_counter() - first, 1e-9)
        cpu = [(0, cpu_first), (seen, time.process_time())]
    finally:
        await consumer.stop()
    assert rejected == 0, f"{rejected} benchmark messages did not decode as token events"
    return {"tokens": seen, "seconds": seconds, "rate": seen / seconds, **_cpu(cpu)}


async def direct_loop(
    bootstrap: str, layout: TopicLayout, model_dir: Path, n: int, max_batch: int
) -> dict[str, float]:
    """The worker's pipeline without faust, in this process: aiokafka ``getmany`` (up to
    ``max_batch`` records) -> `Adapter.process` with an `Engine` on one engine thread (as the
    worker runs it) -> `OutputSender` (acks=all, awaited per batch). No state checkpoints and
    no consumer-offset commits: what faust's per-message path and the checkpoints cost is the
    gap between this row and the worker's.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker under BASE_ENV
    model, manifest = load_checkpoint(model_dir)
    engine = Engine(model, manifest, capacity=100_000)
    adapter = Adapter(engine.vocab)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    sender = OutputSender(bootstrap, client_id="broker-bench-direct")
    await consumer.start()
    await sender.start()
    loop = asyncio.get_running_loop()
    try:
        tps = [TopicPartition(layout.tokens, p) for p in range(layout.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first, cpu_first = 0, 0.0, 0.0
        deadline = time.monotonic() + 300
        while seen < n and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=200, max_records=max_batch)
            records = [
                RawRecord(r.key, r.value, r.topic, r.partition, r.offset, r.timestamp / 1000)
                for batch in polled.values()
                for r in batch
            ]
            if not records:
                continue
            out = await loop.run_in_executor(executor, adapter.process, records, engine)
            await asyncio.gather(*await sender.send(layout.predictions, out.predictions))
            if not seen:  # timed from the first batch's outputs, like the worker
                first, cpu_first = time.perf_counter(), time.process_time()
            seen += len(records)
        if seen < n:
            raise TimeoutError(f"the direct loop processed {seen} of {n} messages")
        seconds = max(time.perf_counter() - first, 1e-9)
        cpu = [(0, cpu_first), (seen, time.process_time())]
    finally:
        await sender.stop()
        await consumer.stop()
        executor.shutdown()
        torch.set_num_threads(threads)
    return {"tokens": seen, "seconds": seconds, "rate": seen / seconds, **_cpu(cpu)}


class _Pred(msgspec.Struct):
    ts: float
    latency_s: float | None = None


async def latency_run(
    bootstrap: str, layout: TopicLayout, rate: float, seconds: float, cfg: BenchConfig
) -> dict[str, Any]:
    """Feed ``rate`` tokens/s for ``seconds`` to a running worker; latency percentiles.

    The producer sends the tokens due every 5 ms as one batch per partition, each stamped
    with its send time; a consumer in the same loop receives the predictions.
    """
    decode = msgspec.json.Decoder(_Pred).decode
    # as a reader of an exactly-once worker must read: only committed transactions
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    sender = OutputSender(bootstrap, client_id="broker-bench-paced", linger_ms=0)
    await sender.start()
    worker_lat: list[float] = []
    e2e: list[float] = []
    sent = 0
    producing = True

    async def receive() -> None:
        while producing or len(e2e) < sent:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batches.values():
                for rec in records:
                    pred = decode(rec.value)
                    if pred.latency_s is None:
                        continue
                    worker_lat.append(pred.latency_s)
                    e2e.append(now - (pred.ts - pred.latency_s))

    try:
        tps = [TopicPartition(layout.predictions, p) for p in range(layout.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, not after the first predictions
            await consumer.position(tp)
        rng = random.Random(cfg.seed + 1)  # noqa: S311 - benchmark data
        names = [f"user-{i}".encode() for i in range(cfg.keys)]
        receiver = asyncio.create_task(receive())
        futures: list[asyncio.Future[Any]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(rate * elapsed) - sent
            if due > 0:
                now = time.time()
                batch = [
                    (rng.choice(names), encode_event(TokenEvent(f"t{rng.randrange(cfg.vocab - 4)}", now)))
                    for _ in range(due)
                ]  # fmt: skip
                futures += await sender.send(layout.tokens, batch)
                sent += due
            await asyncio.sleep(0.005)
        produced_s = time.monotonic() - started
        await asyncio.gather(*futures)
        producing = False
        try:
            await asyncio.wait_for(receiver, timeout=60)
        except asyncio.TimeoutError:
            pass
    finally:
        await sender.stop()
        await consumer.stop()
    if not e2e:
        raise RuntimeError(f"no predictions came back for {sent} paced tokens")
    return {
        "rate_target": rate,
        "rate_sent": sent / produced_s,
        "sent": sent,
        "received": len(e2e),
        "worker_latency_s": percentiles(worker_lat),
        "end_to_end_s": percentiles(e2e),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    q = torch.tensor(values, dtype=torch.float64)
    p50, p99 = torch.quantile(q, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return {"p50": p50, "p99": p99, "max": float(q.max()), "mean": float(q.mean())}


# ------------------------------------------------------------------------------- the run
def run(
    bootstrap: str, cfg: BenchConfig, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every measurement against the broker at ``bootstrap``; the results as a dict."""
    started = time.monotonic()
    rng = random.Random(cfg.seed)  # noqa: S311 - benchmark data
    model_dir = build_model(workdir / "model", cfg)
    results: dict[str, Any] = {"config": asdict(cfg), "rows": {}, "loadavg_start": os.getloadavg()}
    rows = results["rows"]

    messages = make_messages(cfg.tokens, cfg.keys, cfg.vocab, rng)

    def fresh_backlog(prefix: str) -> TopicLayout:
        # Every worker drain needs topics of its own: a worker restores the keys' states from
        # the tokens topic's state topic and skips the tokens they already hold (exactly-once),
        # so a second worker on the same topics would have nothing left to do.
        layout = stream_topics(bootstrap, prefix, cfg.partitions)
        rate = asyncio.run(produce(bootstrap, layout.tokens, messages))
        log(f"produced {cfg.tokens:,} token events at {rate:,.0f}/s to {layout.tokens}")
        return layout

    backlog = fresh_backlog("bench")
    rows["ceiling"] = asyncio.run(consume_ceiling(bootstrap, backlog, cfg.tokens))
    log(f"ceiling: {rows['ceiling']['rate']:,.0f} tokens/s")
    if cfg.direct:
        direct = fresh_outputs(bootstrap, backlog)
        rows["direct"] = asyncio.run(
            direct_loop(bootstrap, direct, model_dir, cfg.tokens, cfg.max_batch)
        )
        log(f"direct aiokafka + engine loop: {rows['direct']['rate']:,.0f} tokens/s")

    # The worker under each guarantee, back to back on the same messages: backlog drain, then
    # the latency a read_committed reader sees at half of that guarantee's maximum.
    for row, latency_key, extra in (
        ("worker", "latency", []),
        ("worker_alo", "latency_alo", ["--guarantee", "at-least-once"]),
    ):
        worker_topics = fresh_backlog(row)
        rows[row], worker, port = measure_worker(
            bootstrap, model_dir, worker_topics, cfg.tokens, cfg, workdir, args=extra, keep=True
        )
        log(f"{row}: {rows[row]['rate']:,.0f} tokens/s")
        assert worker is not None
        try:
            before = status(port) or {}
            rate = cfg.latency_rate or rows[row]["rate"] / 2
            results[latency_key] = asyncio.run(
                latency_run(bootstrap, worker_topics, rate, cfg.latency_seconds, cfg)
            )
            after = status(port) or {}
            lat = results[latency_key]
            lat["worker"] = {  # what the worker did during the latency run
                k: after.get(k, 0) - before.get(k, 0)
                for k in ("batches", "tokens", "checkpoints", "checkpoint_seconds", "busy_s",
                          "commits", "transactions", "commit_seconds")
            }  # fmt: skip
            log(f"{latency_key} at {lat['rate_sent']:,.0f} tokens/s: end to end p50 "
                f"{lat['end_to_end_s']['p50'] * 1e3:.0f} ms, p99 {lat['end_to_end_s']['p99'] * 1e3:.0f} ms")  # fmt: skip
        finally:
            worker.stop()

    if cfg.faust_refs:
        for mode, row in (
            ("empty-queue", "queue"),
            ("empty-take", "take"),
            ("empty-events", "events"),
        ):
            rows[row] = measure_agent(mode, bootstrap, backlog, cfg.tokens, cfg, workdir)
            log(f"faust {mode}: {rows[row]['rate']:,.0f} messages/s")

    naive = stream_topics(bootstrap, "naive", cfg.partitions)
    naive_messages = make_messages(cfg.naive_tokens, cfg.keys, cfg.vocab, rng)
    asyncio.run(produce(bootstrap, naive.tokens, naive_messages))
    rows["naive"] = measure_agent(
        "naive", bootstrap, naive, cfg.naive_tokens, cfg, workdir, model_dir=model_dir
    )
    log(f"naive agent: {rows['naive']['rate']:,.0f} tokens/s")

    if cfg.sweep:
        results["sweep"] = []
        for label, env, args in SWEEP:
            got, _, _ = measure_worker(
                bootstrap, model_dir, fresh_backlog("sweep"), cfg.tokens, cfg, workdir,
                env=env, args=args,
            )  # fmt: skip
            results["sweep"].append({"setting": label, "env": env, "args": args, **got})
            log(f"sweep {label}: {got['rate']:,.0f} tokens/s")

    worker_rate = rows["worker"]["rate"]
    results["ratios"] = {
        "worker/ceiling": worker_rate / rows["ceiling"]["rate"],
        "worker/naive": worker_rate / rows["naive"]["rate"],
        "exactly-once/at-least-once": worker_rate / rows["worker_alo"]["rate"],
    }
    if "queue" in rows:
        results["ratios"]["worker/empty faust agent"] = worker_rate / rows["queue"]["rate"]
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    return results


def report(results: dict[str, Any]) -> str:
    cfg, rows = results["config"], results["rows"]
    lines = [
        f"GRU {cfg['layers']}x{cfg['hidden']}, vocab {cfg['vocab']}, {cfg['keys']:,} keys, "
        f"{cfg['partitions']} partitions, max_batch {cfg['max_batch']}, max_wait "
        f"{cfg['max_wait']}s, worker env {BASE_ENV | cfg['worker_env']}, "
        f"load average {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}",
        f"{'path':<44} {'messages':>9} {'tokens/s':>10} {'worker / it':>12} {'CPU us/token':>13}",
    ]
    names = {
        "worker": "stream-rnn worker, exactly-once (drain)",
        "worker_alo": "stream-rnn worker, at-least-once (drain)",
        "queue": "faust agent, worker's take_batches, empty",
        "take": "faust take_events, empty agent",
        "events": "faust stream.events(), empty agent",
        "direct": "aiokafka + Adapter/Engine + sender, no faust",
        "ceiling": "aiokafka getmany + decode (ceiling)",
        "naive": "hand-written faust agent (naive)",
    }
    worker = rows["worker"]["rate"]
    for key, name in names.items():
        if key in rows:
            row = rows[key]
            lines.append(
                f"{name:<44} {row['tokens']:>9,} {row['rate']:>10,.0f} "
                f"{worker / row['rate']:>11.2f}x {row['cpu_us_per_token']:>13.1f}"
            )
    ratios = results["ratios"]
    lines.append(
        f"targets: worker/ceiling >= 0.5 ({ratios['worker/ceiling']:.2f}), "
        f"worker/naive >= 5 ({ratios['worker/naive']:.1f}), exactly-once/at-least-once >= 0.8 "
        f"({ratios['exactly-once/at-least-once']:.2f})"
    )
    for guarantee, latency_key in (("exactly-once", "latency"), ("at-least-once", "latency_alo")):
        lat = results[latency_key]
        done = lat.get("worker", {})
        if done.get("batches"):
            lines.append(
                f"{guarantee} latency run: {done['batches']} micro-batches of "
                f"{done['tokens'] / done['batches']:.0f} tokens on average, "
                f"{done.get('commits', 0)} commits ({done.get('transactions', 0)} transactions, "
                f"{done.get('commit_seconds', 0.0):.1f} s), {done['checkpoints']} checkpoints "
                f"({done['checkpoint_seconds']:.1f} s)"
            )
        for what, key in (
            ("worker latency_s", "worker_latency_s"),
            ("read_committed reader", "end_to_end_s"),
        ):
            p = lat[key]
            lines.append(
                f"{guarantee} latency at {lat['rate_sent']:,.0f} tokens/s ({lat['received']:,} "
                f"predictions), {what}: p50 {p['p50'] * 1e3:.1f} ms, p99 {p['p99'] * 1e3:.1f} ms, "
                f"max {p['max'] * 1e3:.1f} ms"
            )
    for entry in results.get("sweep", []):
        lines.append(
            f"sweep: {entry['setting']:<40} {entry['rate']:>8,.0f} tokens/s, "
            f"{entry['cpu_us_per_token']:6.1f} CPU us/token"
        )
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--naive-tokens", type=int, default=defaults.naive_tokens)
    parser.add_argument("--keys", type=int, default=defaults.keys)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--latency-seconds", type=float, default=defaults.latency_seconds)
    parser.add_argument("--latency-rate", type=float, default=None,
                        help="tokens/s of the latency run (default: half the worker's maximum)")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-wait", type=float, default=defaults.max_wait)
    parser.add_argument("--worker-env", type=_env_pair, action="append", default=[],
                        help="KEY=VALUE for the worker and agents (KEY= unsets)")  # fmt: skip
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra `stream-rnn worker` flag (repeat: --worker-arg=--storage ...)")  # fmt: skip
    parser.add_argument("--no-faust-refs", action="store_true", help="skip the empty agents")
    parser.add_argument("--no-direct", action="store_true", help="skip the faust-less loop")
    parser.add_argument("--sweep", action="store_true", help="one drain per setting in SWEEP")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    cfg = BenchConfig(
        tokens=args.tokens,
        naive_tokens=args.naive_tokens,
        keys=args.keys,
        partitions=args.partitions,
        latency_seconds=args.latency_seconds,
        latency_rate=args.latency_rate,
        max_batch=args.max_batch,
        max_wait=args.max_wait,
        worker_env=dict(args.worker_env),
        worker_args=list(args.worker_arg),
        faust_refs=not args.no_faust_refs,
        direct=not args.no_direct,
        sweep=args.sweep,
    )
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        workdir = Path(tmp)
        kafka = LocalKafka(workdir / "kafka")
        bootstrap = kafka.start().bootstrap
        print(f"local broker at {bootstrap}", flush=True)
        try:
            results = run(bootstrap, cfg, workdir, log=lambda s: print(s, flush=True))
        finally:
            kafka.stop()
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_finite(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
