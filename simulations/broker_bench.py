"""One stream worker through a real local Kafka broker, against references, in one run.

Setup (issue 10, section 4): next-token GRU 2 layers x 128, vocabulary 256, ~10,000 keys,
tokens spread at random over the keys, a tokens topic of 4 partitions, CPU, random weights
saved with ``save_checkpoint``. One broker (``LocalKafka`` in a temporary directory) serves
every row:

* pipe     — the honest per-message reference: one process, aiokafka ``getmany`` -> msgspec
             decode -> one produced ~200-byte message per input (``consume_bench.py``'s pipe);
* ceiling  — a plain aiokafka consumer that decodes and produces nothing;
* direct   — the worker's pipeline without faust, in this process (aiokafka ``getmany`` ->
             ``Adapter.process`` on an engine thread -> `OutputSender`; no commits);
* worker rows — one ``stream-rnn worker`` process drains a pre-produced backlog of ``--tokens``
             tokens (the sustained maximum: tokens / (last prediction's ``ts`` - first's)),
             per-token events and ``tokens`` chunks of ``--chunk``, exactly-once (the default)
             and at-least-once; then, caught up, it is fed by a paced producer in this process
             at 10/25/50/75 % of that maximum for ``--latency-seconds`` each: latency from the
             producer's ``ts`` to the prediction as a read_committed reader here receives it;
* queue / take / events — faust alone: empty agents (``faust_naive_agent.py``);
* naive    — the usual hand-written faust agent: one event at a time, ``json``, a faust
             ``Table``, batch-1 network step, one ``send`` per prediction;
* engine / dense — ``Engine.process`` alone against the same network on dense batches with
             no bookkeeping (``engine_bench.py``), in this process, one torch thread.

The report lists every row with its ratio to the pipe, the latency curve, and issue 10's
targets, met or missed; ``--plot`` draws the curve (PNG), ``--out`` keeps the JSON.

Run: ``.venv/bin/python simulations/broker_bench.py [--tokens N] [--chunk 16] [--keys N]
[--partitions N] [--latency-seconds S] [--worker-env K=V ...] [--out results.json]
[--plot curve.png] [--readme FILE]``. ``--sweep`` also drains the backlog once per worker setting
in ``SWEEP``. ``python -m simulations.bench`` runs this benchmark as its broker section (`run`)
with every other one, and writes the README's performance block.
Every row also reports the CPU time its process spent per token (all threads, from /proc or
``time.process_time``): on a machine shared with other work it moves much less than rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
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
from stream_rnn.engine.events import TOKEN, Event
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import ManagedProcess, find_free_port, worker_status
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.checkpoint import load_checkpoint, save_checkpoint
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.stream.codec import decode_batch, decode_key, encode_event
from stream_rnn.stream.messages import TokenEvent, TokensEvent
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.topics import TopicLayout, ensure_topics
from stream_rnn.train.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run by its path: the sibling scripts are the package's
    sys.path.insert(0, str(REPO))
from simulations.consume_bench import measure_pipe  # noqa: E402
from simulations.engine_bench import build, run_ceiling, run_engine  # noqa: E402

AGENT = REPO / "simulations" / "faust_naive_agent.py"
POLL_S = 0.25
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
    """Sizes of one run; the defaults take about 6 minutes on 2 shared cores."""

    tokens: int = 200_000
    chunk: int = 16
    naive_tokens: int = 5_000
    keys: int = 10_000
    partitions: int = 4
    latency_seconds: float = 10.0
    fractions: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75)
    latency_rate: float | None = None  # tokens/s taken as the maximum (tests); None: measured
    commit_interval: float = field(default_factory=lambda: Settings().commit_interval_s)
    layers: int = 2
    hidden: int = 128
    embed: int = 64
    vocab: int = 256
    max_batch: int = 1024
    max_wait: float = 0.005
    worker_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    faust_refs: bool = True  # the three empty faust agents
    direct: bool = True  # the faust-less pipeline in this process
    metrics_pair: bool = True  # the /metrics cost: a drain without and one with it
    naive: bool = True  # the hand-written faust agent
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


def make_chunk_messages(
    n: int, keys: int, vocab: int, chunk: int, rng: random.Random, ts: float | None = None
) -> list[tuple[bytes, bytes]]:
    """``n`` tokens as ``tokens`` events of ``chunk`` tokens each, each chunk to a random key
    (what `TokenProducer` sends when a key's tokens arrive faster than its linger window)."""
    names = [f"user-{i}".encode() for i in range(keys)]
    when = time.time() if ts is None else ts
    return [
        (
            rng.choice(names),
            encode_event(TokensEvent([f"t{rng.randrange(vocab - 4)}" for _ in range(chunk)], when)),
        )
        for _ in range(n // chunk)
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
def _process(argv: list[str], log: Path, env: dict[str, str]) -> ManagedProcess:
    """``argv`` with BASE_ENV under ``env`` ("" unsets a variable), output in ``log``."""
    merged = {**BASE_ENV, **env}
    return ManagedProcess(
        argv, log, env={k: (v or None) for k, v in merged.items()}, cwd=REPO, name=log.stem
    )


def start_worker(
    bootstrap: str,
    model_dir: Path,
    layout: TopicLayout,
    cfg: BenchConfig,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    group: str | None = None,
    model_args: Sequence[str] | None = None,
) -> tuple[ManagedProcess, int]:
    """A ``stream-rnn worker`` process on ``layout``; returns it and its port.

    ``group``: the consumer group (default: one of its own); ``model_args`` replace
    ``--model MODEL_DIR`` (``["--registry", DIR]`` for a worker that follows a registry).
    """
    port = find_free_port()
    source = ["--model", str(model_dir)] if model_args is None else list(model_args)
    argv = [
        sys.executable, "-m", "stream_rnn", "worker", *source,
        "--bootstrap", bootstrap, "--group", group or f"bench-{secrets.token_hex(3)}",
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
    return _process(argv, log, worker_env), port


def start_agent(
    mode: str,
    bootstrap: str,
    layout: TopicLayout,
    cfg: BenchConfig,
    workdir: Path,
    *,
    model_dir: Path | None = None,
    expect: int = 0,
) -> tuple[ManagedProcess, Path]:
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
    return _process(argv, workdir / f"{tag}.log", cfg.worker_env), done


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
    proc: ManagedProcess,
    timeout_s: float,
    port: int | None = None,
    count_field: str = "predictions",
) -> dict[str, float]:
    """Wait for ``n`` predictions; tokens/s between the first and the last one (their ``ts``).

    ``count_field``: the worker status field that counts to ``n`` (``tokens`` for chunks, whose
    predictions are one message per chunk).

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
            total = int((worker_status(port) or {}).get(count_field, 0))
        else:
            total = offsets.total()
        if total:
            cpu[1 if cpu else 0 :] = [(total, proc.cpu_seconds())]
        return total >= n

    try:
        proc.wait_for(done, f"{n} predictions", timeout_s, poll_s=POLL_S)
        if port is not None:
            time.sleep(1.0)  # the last transaction commits (0.1 s by default)
        first, last, count = offsets.span("ts")
    finally:
        offsets.close()
    count = n if port is not None else count
    # a drain that fits in one micro-batch has no span (tiny test runs): one poll as a floor
    seconds = max(last - first, POLL_S)
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
    count: str = "predictions",
) -> tuple[dict[str, Any], ManagedProcess | None, int]:
    """Backlog drain of one worker over ``layout`` (which already holds ``n`` tokens, and
    whose state topic is empty).

    With ``keep`` the worker is left running (for the latency run) and returned.
    """
    proc, port = start_worker(bootstrap, model_dir, layout, cfg, workdir, env=env, args=args)
    try:
        result: dict[str, Any] = drain_rate(
            bootstrap, layout, n, proc, cfg.drain_timeout_s, port=port, count_field=count
        )
        result["status"] = worker_status(port) or {}
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


def measure_metrics_drain(
    bootstrap: str,
    model_dir: Path,
    layout: TopicLayout,
    cfg: BenchConfig,
    workdir: Path,
    extra: list[str],
) -> dict[str, Any]:
    """A per-token drain; with ``--metrics-port 0`` in ``extra`` a free port is taken and
    /metrics is fetched once a second while the worker drains (each scrape must succeed)."""
    args = list(extra)
    port = None
    if "--metrics-port" in args:
        port = find_free_port()
        args[args.index("--metrics-port") + 1] = str(port)
    scrapes: list[int] = []
    stop = threading.Event()

    def scrape() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:  # noqa: S310 - loopback
                    scrapes.append(len(r.read()))
            except OSError:
                pass  # not serving yet (the worker is starting)
            if stop.wait(1.0):
                return

    scraper = threading.Thread(target=scrape, daemon=True) if port is not None else None
    if scraper is not None:
        scraper.start()
    try:
        result, _, _ = measure_worker(
            bootstrap, model_dir, layout, cfg.tokens, cfg, workdir, args=args, count="tokens"
        )
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(5)
    if port is not None:
        if not scrapes:
            raise RuntimeError("no /metrics scrape succeeded during the drain")
        result["scrapes"] = len(scrapes)
        result["scrape_bytes"] = scrapes[-1]
    return result


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
        proc.wait_for(done.exists, f"{n} messages", cfg.drain_timeout_s, poll_s=POLL_S)
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
    adapter = Adapter()
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
    bootstrap: str,
    layout: TopicLayout,
    rate: float,
    seconds: float,
    cfg: BenchConfig,
    *,
    chunk: int = 1,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Feed ``rate`` tokens/s for ``seconds`` to a running worker; latency percentiles.

    The producer sends the tokens due every 5 ms as one batch per partition, each stamped
    with its send time; a consumer in the same loop receives the predictions. ``chunk`` > 1:
    the tokens go as ``tokens`` events of ``chunk`` tokens (one prediction message each,
    stamped with the chunk's send time). ``stop`` (set from another thread) ends the load
    before ``seconds``.
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

        def event(now: float) -> bytes:
            tokens: list[str | int] = [f"t{rng.randrange(cfg.vocab - 4)}" for _ in range(chunk)]
            if chunk == 1:
                return encode_event(TokenEvent(tokens[0], now))
            return encode_event(TokensEvent(tokens, now))

        while (elapsed := time.monotonic() - started) < seconds and not (stop and stop.is_set()):
            due = int(rate * elapsed / chunk) - sent  # messages
            if due > 0:
                now = time.time()
                batch = [(rng.choice(names), event(now)) for _ in range(due)]
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
        "rate_sent": sent * chunk / produced_s,
        "chunk": chunk,
        "sent": sent,
        "received": len(e2e),
        "worker_latency_s": percentiles(worker_lat),
        "end_to_end_s": percentiles(e2e),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    q = torch.tensor(values, dtype=torch.float64)
    qs = torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64)
    p50, p95, p99 = torch.quantile(q, qs).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "max": float(q.max()), "mean": float(q.mean())}


# ------------------------------------------------------------------------------- the run
# The latency curve: each worker configuration, caught up after its drain, is fed at these
# fractions of the maximum rate it just measured.
FRACTIONS = (0.10, 0.25, 0.50, 0.75)


def row_titles(chunk: int) -> dict[str, str]:
    """What each row of a run measures, by row name, in the report's order."""
    return {
        **{row: title for row, title, _, _ in worker_configs(BenchConfig(chunk=chunk))},
        "pipe": "pass-through pipe: aiokafka + decode + 1 produce/msg",
        "direct": "aiokafka + Adapter/Engine + sender, no faust",
        "ceiling": "aiokafka getmany + decode, produces nothing",
        "queue": "faust agent, worker's take_batches, empty",
        "take": "faust take_events, empty agent",
        "events": "faust stream.events(), empty agent",
        "naive": "hand-written faust agent (naive)",
        "metrics_off": "worker, exactly-once, per token (metrics pair: off)",
        "metrics_on": "worker, same, --metrics-port scraped every 1 s",
        "engine": "Engine.process alone, keys resident (1 thread)",
        "engine_cold": "Engine.process alone, cold: keys admitted on use",
        "dense": "dense ceiling: same network, no bookkeeping",
    }


def worker_configs(cfg: BenchConfig) -> list[tuple[str, str, list[str], int]]:
    """(row, title, extra worker flags, tokens per message) of the worker rows."""
    alo = ["--guarantee", "at-least-once"]
    return [
        ("worker", "worker, exactly-once (default), per token", [], 1),
        ("worker_alo", "worker, at-least-once, per token", alo, 1),
        ("worker_chunks", f"worker, exactly-once, chunks of {cfg.chunk}", [], cfg.chunk),
        ("worker_chunks_alo", f"worker, at-least-once, chunks of {cfg.chunk}", alo, cfg.chunk),
    ]


def engine_rows(cfg: BenchConfig, rounds: int = 3) -> dict[str, dict[str, float]]:
    """`Engine.process` against the dense ceiling (engine_bench.py's two paths), one torch
    thread as the worker runs it, median of ``rounds`` back-to-back rounds.

    The engine is measured in steady state (every key resident, as in a worker that has run
    a while: the ceiling has no keys to admit either) and cold (keys admitted as they first
    appear); the target compares the steady state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, manifest = build("cpu", cfg.layers, cfg.hidden, cfg.vocab)
        rng = random.Random(cfg.seed)  # noqa: S311 - benchmark data
        keys = [f"user-{i}" for i in range(cfg.keys)]
        n = min(cfg.tokens, 100_000)
        events = [
            Event(rng.choice(keys), TOKEN, token=rng.randrange(4, cfg.vocab), id=f"0:{i}")
            for i in range(n)
        ]
        got = []
        for _ in range(rounds):
            engine = run_engine(model, manifest, events, cfg.max_batch, cfg.keys, steady=True)
            cold = run_engine(model, manifest, events, cfg.max_batch, cfg.keys)
            ceiling = run_ceiling(model, n, cfg.max_batch)
            got.append((engine, cold, ceiling))
    finally:
        torch.set_num_threads(threads)
    med = statistics.median
    return {
        "engine": {"tokens": n, "rate": med(e for e, _, _ in got)},
        "engine_cold": {"tokens": n, "rate": med(c for _, c, _ in got)},
        "dense": {"tokens": n, "rate": med(d for _, _, d in got)},
        "engine/dense": {"ratio": med(e / d for e, _, d in got)},
        "engine_cold/dense": {"ratio": med(c / d for _, c, d in got)},
    }


def run(
    bootstrap: str, cfg: BenchConfig, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every measurement against the broker at ``bootstrap``; the results as a dict."""
    started = time.monotonic()
    rng = random.Random(cfg.seed)  # noqa: S311 - benchmark data
    model_dir = build_model(workdir / "model", cfg)
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "rows": {},
        "curve": {},
        "loadavg_start": os.getloadavg(),
    }
    rows = results["rows"]

    messages = make_messages(cfg.tokens, cfg.keys, cfg.vocab, rng)
    chunks = make_chunk_messages(cfg.tokens, cfg.keys, cfg.vocab, cfg.chunk, rng)

    def fresh_backlog(prefix: str, backlog: list[tuple[bytes, bytes]]) -> TopicLayout:
        # Every worker drain needs topics of its own: a worker restores the keys' states from
        # the tokens topic's state topic and skips the tokens they already hold (exactly-once),
        # so a second worker on the same topics would have nothing left to do.
        layout = stream_topics(bootstrap, prefix, cfg.partitions)
        rate = asyncio.run(produce(bootstrap, layout.tokens, backlog))
        log(f"produced {len(backlog):,} messages at {rate:,.0f}/s to {layout.tokens}")
        return layout

    backlog = fresh_backlog("bench", messages)
    pipe_out = fresh_outputs(bootstrap, backlog)
    pipe = asyncio.run(
        measure_pipe(bootstrap, backlog.tokens, pipe_out.predictions, cfg.tokens, cfg.partitions)
    )
    rows["pipe"] = {"tokens": pipe["messages"], "seconds": pipe["seconds"],
                    "rate": pipe["rate"], "cpu_us_per_token": pipe["cpu_us_per_message"]}  # fmt: skip
    log(f"pass-through pipe: {rows['pipe']['rate']:,.0f} messages/s")
    rows["ceiling"] = asyncio.run(consume_ceiling(bootstrap, backlog, cfg.tokens))
    log(f"consume-only ceiling: {rows['ceiling']['rate']:,.0f} tokens/s")
    if cfg.direct:
        direct = fresh_outputs(bootstrap, backlog)
        rows["direct"] = asyncio.run(
            direct_loop(bootstrap, direct, model_dir, cfg.tokens, cfg.max_batch)
        )
        log(f"direct aiokafka + engine loop: {rows['direct']['rate']:,.0f} tokens/s")

    # Each worker configuration: a backlog drain (its maximum), then, caught up, the latency a
    # read_committed reader sees at FRACTIONS of that maximum.
    for row, _title, extra, chunk in worker_configs(cfg):
        topics = fresh_backlog(row, messages if chunk == 1 else chunks)
        rows[row], worker, port = measure_worker(
            bootstrap, model_dir, topics, cfg.tokens, cfg, workdir, args=extra, keep=True,
            count="tokens",
        )  # fmt: skip
        log(f"{row}: {rows[row]['rate']:,.0f} tokens/s")
        assert worker is not None
        curve = results["curve"][row] = []
        try:
            for fraction in cfg.fractions:
                before = worker_status(port) or {}
                rate = (cfg.latency_rate or rows[row]["rate"]) * fraction
                lat = asyncio.run(
                    latency_run(bootstrap, topics, rate, cfg.latency_seconds, cfg, chunk=chunk)
                )
                after = worker_status(port) or {}
                lat["fraction"] = fraction
                lat["worker"] = {  # what the worker did during the latency run
                    k: after.get(k, 0) - before.get(k, 0)
                    for k in ("batches", "tokens", "checkpoints", "checkpoint_seconds",
                              "busy_s", "commits", "transactions", "commit_seconds")
                }  # fmt: skip
                curve.append(lat)
                e2e = lat["end_to_end_s"]
                log(f"  {fraction:.0%} ({lat['rate_sent']:,.0f} tokens/s): end to end p50 "
                    f"{e2e['p50'] * 1e3:.1f} ms, p99 {e2e['p99'] * 1e3:.1f} ms")  # fmt: skip
        finally:
            worker.stop()

    # The cost of /metrics: the same drain without and with --metrics-port, back to back, the
    # latter scraped once a second (Prometheus scrapes every 5 s in deploy/).
    metrics_pairs: tuple[tuple[str, list[str]], ...] = (
        ("metrics_off", []),
        ("metrics_on", ["--metrics-port", "0"]),
    )
    # Two rounds in ABBA order (off, on, on, off): drift hits both sides alike; the rows hold
    # the mean rate and the mean worker CPU per token. The target compares CPU per token: on
    # two cores shared with the broker and this process, one drain's rate moved by up to 26 %
    # between two runs of the same setting, its CPU per token by a few percent.
    pair_runs: dict[str, list[dict[str, Any]]] = {row: [] for row, _ in metrics_pairs}
    for order in (metrics_pairs, metrics_pairs[::-1]) if cfg.metrics_pair else ():
        for row, extra in order:
            got = measure_metrics_drain(
                bootstrap, model_dir, fresh_backlog(row, messages), cfg, workdir, extra
            )
            pair_runs[row].append(got)
            log(f"{row}: {got['rate']:,.0f} tokens/s")
    for row, runs in pair_runs.items():
        if runs:
            cpu = [r["cpu_us_per_token"] for r in runs if math.isfinite(r["cpu_us_per_token"])]
            rows[row] = {**runs[-1], "rate": statistics.fmean(r["rate"] for r in runs),
                         "rates": [r["rate"] for r in runs],
                         "cpu_us_per_token": statistics.fmean(cpu) if cpu else math.nan}  # fmt: skip

    if cfg.faust_refs:
        for mode, row in (
            ("empty-queue", "queue"),
            ("empty-take", "take"),
            ("empty-events", "events"),
        ):
            rows[row] = measure_agent(mode, bootstrap, backlog, cfg.tokens, cfg, workdir)
            log(f"faust {mode}: {rows[row]['rate']:,.0f} messages/s")

    if cfg.naive:
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
                bootstrap, model_dir, fresh_backlog("sweep", messages), cfg.tokens, cfg,
                workdir, env=env, args=args,
            )  # fmt: skip
            results["sweep"].append({"setting": label, "env": env, "args": args, **got})
            log(f"sweep {label}: {got['rate']:,.0f} tokens/s")

    engine = engine_rows(cfg)
    rows["engine"], rows["dense"] = engine["engine"], engine["dense"]
    rows["engine_cold"] = engine["engine_cold"]
    log(f"engine alone: {rows['engine']['rate']:,.0f} tokens/s, dense ceiling "
        f"{rows['dense']['rate']:,.0f}")  # fmt: skip

    worker_rate = rows["worker"]["rate"]
    pipe_rate = rows["pipe"]["rate"]
    results["ratios"] = {
        "worker/pipe": worker_rate / pipe_rate,
        "worker_alo/pipe": rows["worker_alo"]["rate"] / pipe_rate,
        "worker_chunks/pipe": rows["worker_chunks"]["rate"] / pipe_rate,
        "worker_chunks_alo/pipe": rows["worker_chunks_alo"]["rate"] / pipe_rate,
        "exactly-once/at-least-once": worker_rate / rows["worker_alo"]["rate"],
        "engine/dense": engine["engine/dense"]["ratio"],
        "engine_cold/dense": engine["engine_cold/dense"]["ratio"],
    }
    if "naive" in rows:
        results["ratios"]["worker/naive"] = worker_rate / rows["naive"]["rate"]
    if "metrics_on" in rows:
        results["ratios"]["metrics on/off"] = (
            rows["metrics_on"]["rate"] / rows["metrics_off"]["rate"]
        )
        # CPU per token without / with: the throughput the scraped worker keeps, CPU-bound
        results["ratios"]["metrics cpu off/on"] = (
            rows["metrics_off"]["cpu_us_per_token"] / rows["metrics_on"]["cpu_us_per_token"]
        )
    if "queue" in rows:
        results["ratios"]["worker/empty faust agent"] = worker_rate / rows["queue"]["rate"]
    results["commit_interval_s"] = cfg.commit_interval
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    return results


def at_fraction(results: dict[str, Any], row: str, fraction: float) -> dict[str, Any] | None:
    """The latency run of worker ``row`` at ``fraction`` of its maximum, if there is one."""
    for lat in results["curve"].get(row, []):
        if abs(lat["fraction"] - fraction) < 1e-9:
            found: dict[str, Any] = lat
            return found
    return None


def targets(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) of issue 10's targets (those whose rows were run)."""
    ratios = results["ratios"]
    wanted = [
        ("per token: worker / pass-through pipe", "worker/pipe", 0.5),
        ("chunks: worker tokens/s / pipe messages/s", "worker_chunks/pipe", 1.5),
        ("worker / hand-written faust agent", "worker/naive", 5),
        ("engine alone / dense ceiling", "engine/dense", 0.8),
        ("/metrics scraped: CPU per token without / with (11)", "metrics cpu off/on", 0.95),
    ]
    out = [
        (what, ratios[name], f">= {bound:g}", ratios[name] >= bound)
        for what, name, bound in wanted
        if name in ratios
    ]
    alo = at_fraction(results, "worker_alo", 0.5)
    if alo is not None:
        e2e = alo["end_to_end_s"]
        out.append(("at-least-once, half rate: p99 end to end (ms)", e2e["p99"] * 1e3, "<= 50",
                    e2e["p99"] <= 0.050))  # fmt: skip
        out.append(("at-least-once, half rate: p50 end to end (ms)", e2e["p50"] * 1e3, "<= 15",
                    e2e["p50"] <= 0.015))  # fmt: skip
    eo = at_fraction(results, "worker", 0.5)
    if eo is not None:
        bound = results["commit_interval_s"] + 0.050
        p99 = eo["end_to_end_s"]["p99"]
        out.append(("exactly-once, half rate: p99 read_committed (ms)", p99 * 1e3,
                    f"<= {bound * 1e3:.0f}", p99 <= bound))  # fmt: skip
    return out


def report(results: dict[str, Any]) -> str:
    cfg, rows = results["config"], results["rows"]
    lines = [
        f"GRU {cfg['layers']}x{cfg['hidden']}, vocab {cfg['vocab']}, {cfg['keys']:,} keys, "
        f"{cfg['partitions']} partitions, max_batch {cfg['max_batch']}, max_wait "
        f"{cfg['max_wait']}s, worker env {BASE_ENV | cfg['worker_env']}, "
        f"load average {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}",
        "",
        f"{'path':<52} {'tokens':>9} {'tokens/s':>10} {'vs pipe':>8} {'CPU us/token':>13}",
    ]
    names = row_titles(cfg["chunk"])
    pipe = rows["pipe"]["rate"]
    for key, name in names.items():
        if key in rows:
            row = rows[key]
            cpu = row.get("cpu_us_per_token", float("nan"))
            lines.append(
                f"{name:<52} {row['tokens']:>9,} {row['rate']:>10,.0f} "
                f"{row['rate'] / pipe:>7.2f}x {cpu:>13.1f}"
            )
    lines += ["", "latency, producer ts -> prediction read (read_committed), by offered load:",
              f"{'worker':<44} {'load':>5} {'tokens/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7} {'batch':>6}"]  # fmt: skip
    for row, title, _, _ in worker_configs(BenchConfig(chunk=cfg["chunk"])):
        for lat in results["curve"].get(row, []):
            e2e, done = lat["end_to_end_s"], lat.get("worker", {})
            batch = done["tokens"] / done["batches"] if done.get("batches") else float("nan")
            lines.append(
                f"{title:<44} {lat['fraction']:>5.0%} {lat['rate_sent']:>9,.0f} "
                f"{e2e['p50'] * 1e3:>7.1f} {e2e['p95'] * 1e3:>7.1f} {e2e['p99'] * 1e3:>7.1f} "
                f"{e2e['max'] * 1e3:>7.1f} {batch:>6.0f}"
            )
    lines += ["", "targets (issue 10):"]
    for what, value, target, met in targets(results):
        lines.append(f"  {what:<50} {value:>9.2f}  target {target:<8} {'met' if met else 'MISSED'}")
    for entry in results.get("sweep", []):
        lines.append(
            f"sweep: {entry['setting']:<40} {entry['rate']:>8,.0f} tokens/s, "
            f"{entry['cpu_us_per_token']:6.1f} CPU us/token"
        )
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def plot_curve(results: dict[str, Any], path: Path) -> None:
    """Latency (p50 solid, p99 dashed) against offered tokens/s, one colour per worker row."""
    import matplotlib  # noqa: PLC0415 - only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for row, title, _, _ in worker_configs(BenchConfig(chunk=results["config"]["chunk"])):
        curve = results["curve"].get(row, [])
        if not curve:
            continue
        x = [lat["rate_sent"] for lat in curve]
        (line,) = ax.plot(x, [lat["end_to_end_s"]["p50"] * 1e3 for lat in curve], "o-",
                          label=f"{title}: p50")  # fmt: skip
        ax.plot(x, [lat["end_to_end_s"]["p99"] * 1e3 for lat in curve], "s--",
                color=line.get_color(), label=f"{title}: p99")  # fmt: skip
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("offered load (tokens/s; points at 10/25/50/75 % of each row's maximum)")
    ax.set_ylabel("producer ts -> prediction read, ms (log)")
    ax.set_yscale("log")
    ax.set_title("stream-rnn worker latency by load (GRU 2x128, 10k keys, 4 partitions, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--chunk", type=int, default=defaults.chunk, help="tokens per chunk")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(defaults.fractions),
                        help="latency runs at these fractions of each worker's maximum")  # fmt: skip
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
    parser.add_argument("--plot", type=Path, default=None, help="write the latency curve PNG")
    parser.add_argument("--readme", type=Path, default=None,
                        help="rewrite this README's broker-bench block with the report")  # fmt: skip
    parser.add_argument("--from-json", type=Path, default=None,
                        help="no run: the report of a saved --out file")  # fmt: skip
    args = parser.parse_args()
    cfg = BenchConfig(
        tokens=args.tokens,
        naive_tokens=args.naive_tokens,
        keys=args.keys,
        partitions=args.partitions,
        latency_seconds=args.latency_seconds,
        chunk=args.chunk,
        fractions=tuple(args.fractions),
        max_batch=args.max_batch,
        max_wait=args.max_wait,
        worker_env=dict(args.worker_env),
        worker_args=list(args.worker_arg),
        faust_refs=not args.no_faust_refs,
        direct=not args.no_direct,
        sweep=args.sweep,
    )
    if args.from_json is not None:  # no run: report (and README, plot) from a saved one
        results = json.loads(args.from_json.read_text())
    else:
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
    if args.plot:
        plot_curve(results, args.plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_finite(results), indent=2) + "\n")
    if args.readme:
        write_readme(args.readme, results, args.plot)


README_START = "<!-- broker-bench:start -->"
README_END = "<!-- broker-bench:end -->"


def write_readme(readme: Path, results: dict[str, Any], plot: Path | None) -> None:
    """Replace the README's block between the broker-bench markers with this run's report."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise SystemExit(
            f"{readme} has no {README_START} ... {README_END} block to rewrite; the project "
            "README's performance block is generated by `python -m simulations.bench` (its "
            "broker section is this benchmark): `python -m simulations.bench --only broker,eo "
            "--from-json docs/perf/bench.json --readme README.md` reruns these rows into it"
        )
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    body = ["", "```text", report(results), "```"]
    if plot is not None:
        link = os.path.relpath(plot.resolve(), readme.resolve().parent)
        body += ["", f"![latency by offered load]({link})"]
    readme.write_text(head + README_START + "\n".join(body) + "\n" + README_END + tail)
    print(f"{readme}: broker benchmark block rewritten", flush=True)


if __name__ == "__main__":
    main()
