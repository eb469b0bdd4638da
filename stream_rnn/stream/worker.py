"""The stream worker: a faust-streaming app with one agent on the tokens topic.

Per micro-batch (``take_events(max_batch, within=max_wait_s)``): raw records -> `Adapter`
(decode, validate, dead-letter) -> `Engine.process` (one batched step per phase) -> encoded
predictions and dead letters -> `OutputSender` (one broker batch per partition, acks=all), and
only once the broker has acknowledged every output is the micro-batch acked (see ``ACK POINT``).
Several workers with the same ``group`` share the tokens topic's partitions; each runs in its
own process (``stream-rnn worker``) with its own engine, its own faust data directory and, if
asked for, its own status port.

Example::

    settings = get_settings()
    opts = WorkerOptions.from_settings("runs/lang", settings, group="g1", max_batch=512)
    run_worker(opts, settings)          # until SIGTERM / SIGINT
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import faust
import torch
from aiokafka.errors import KafkaError
from faust.types import TP, EventT, StreamT

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.pool import StatePool
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.checkpoint import load_checkpoint
from stream_rnn.stream.adapter import Adapter, CountingSensor, Outputs, RawRecord
from stream_rnn.stream.durable import DurableState
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.state import StateWriter
from stream_rnn.stream.status import StatusServer
from stream_rnn.stream.topics import ensure_topics, state_topic

log = logging.getLogger("stream_rnn.worker")
DELIVERY_ATTEMPTS = 3
EXIT_OUTPUTS_LOST = 75  # EX_TEMPFAIL: the broker refused the outputs; restart the worker


class OutputsLost(StreamError):
    """The broker did not take a micro-batch's outputs after every retry."""


@dataclass(frozen=True)
class WorkerOptions:
    """Everything one worker process needs; `from_settings` fills it from `Settings`."""

    model_dir: Path
    bootstrap: str
    device: str = "cpu"
    group: str = "stream-rnn-worker"
    tokens_topic: str = "stream-rnn.tokens"
    predictions_topic: str = "stream-rnn.predictions"
    dead_letter_topic: str = "stream-rnn.dead-letters"
    partitions: int | None = None
    max_batch: int = 1024
    max_wait_s: float = 0.05
    max_message_bytes: int = 4096
    unknown_token: Literal["unk", "reject"] = "unk"  # noqa: S105 - a policy, not a secret
    capacity: int = 100_000
    ttl_s: float | None = None
    storage: str = "float32"
    running_estimate: bool = False
    expire_interval_s: float = 5.0
    stats_interval_s: float = 10.0
    checkpoint_interval_s: float = 2.0
    checkpoint_every: int = 50_000
    web_port: int | None = None
    worker_dir: Path = Path("/tmp/stream-rnn-worker")  # noqa: S108 - overridden by settings
    log_level: str = "INFO"

    @classmethod
    def from_settings(
        cls, model_dir: str | Path, settings: Settings, **overrides: Any
    ) -> WorkerOptions:
        """Options from ``settings``; ``overrides`` (CLI flags) win where not None.

        ``partitions`` is never taken from the settings: given, it is a requirement on the
        tokens topic; absent, an existing topic is used as it is (a new one gets
        ``settings.partitions``).
        """
        names = {f.name for f in fields(cls)} - {"partitions"}
        base = {name: getattr(settings, name) for name in names if hasattr(settings, name)}
        opts = cls(**{**base, "model_dir": Path(model_dir)})
        return replace(opts, **{k: v for k, v in overrides.items() if v is not None})

    def settings(self, base: Settings) -> Settings:
        """``base`` with this worker's topic names (for `ensure_topics`)."""
        return base.model_copy(
            update={
                "tokens_topic": self.tokens_topic,
                "predictions_topic": self.predictions_topic,
                "dead_letter_topic": self.dead_letter_topic,
            }
        )


class StreamWorker:
    """The engine, adapter and sender of one process, and the micro-batch handler.

    The engine runs on one dedicated thread: every call that touches the state pool (process,
    expire) is serialised on it, and the event loop stays free for heartbeats and fetches.
    """

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        device = opts.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, manifest = load_checkpoint(opts.model_dir, device=device)
        # Evicted states live in a local file (bounded memory); the state topic is the truth,
        # so the file starts empty with every process.
        self.workdir = opts.worker_dir / f"{opts.group}-{os.getpid()}"
        self.store = DiskStateStore(self.workdir / "states.db")
        pool = StatePool(
            model.config,
            opts.capacity,
            device=model.embedding.weight.device,
            storage=opts.storage,
            ttl_s=opts.ttl_s,
            store=self.store,
        )
        self.engine = Engine(model, manifest, pool=pool, running_estimate=opts.running_estimate)
        self.sensor = CountingSensor()
        self.adapter = Adapter(
            self.engine.vocab,
            unknown=opts.unknown_token,
            max_bytes=opts.max_message_bytes,
            sensor=self.sensor,
        )
        self.sender = OutputSender(opts.bootstrap, client_id=f"{opts.group}-{os.getpid()}")
        self.assigned: list[int] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.writer = StateWriter(opts.bootstrap, state_topic(opts.tokens_topic))
        self.durable = DurableState(
            self.engine,
            self.store,
            self.writer,
            opts.bootstrap,
            state_topic(opts.tokens_topic),
            self._executor,
            self.sensor,
            interval_s=opts.checkpoint_interval_s,
            every_tokens=opts.checkpoint_every,
        )
        self.unacked: list[EventT] = []
        self._last_expire = time.monotonic()
        self._last_stats = (time.monotonic(), 0)

    async def handle(self, events: Sequence[EventT]) -> None:
        """Process one micro-batch and wait until its outputs are durable on the broker."""
        owned = set(self.assigned)
        # A partition revoked while this batch was buffered belongs to its new owner now.
        events = [e for e in events if e.message.partition in owned]
        await self.durable.ensure_restored({e.message.partition for e in events})
        records = [
            RawRecord(m.key, m.value, m.topic, m.partition, m.offset, m.timestamp)
            for m in (e.message for e in events)
        ]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._executor, self._compute, records)
        await self.deliver(out)
        self.durable.add_tokens(out.tokens)
        self.unacked.extend(events)

    async def commit_point(self, *, force: bool = False) -> None:
        """ACK POINT: ack the processed micro-batches once their states are durable.

        With checkpoints off, a batch is acked as soon as its outputs are on the broker.
        """
        if self.durable.enabled:
            if not (force or self.durable.due()):
                return
            await self.durable.checkpoint()
        for event in self.unacked:
            event.ack()
        self.unacked.clear()

    async def deliver(self, out: Outputs, *, backoff_s: float = 1.0) -> None:
        """Send the outputs; retry the whole set (duplicates are fine: readers dedupe by id).

        aiokafka already retries each request until its timeout, so a failure here means the
        broker has been unreachable for a while; after the last attempt, `OutputsLost`.
        """
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            try:
                futures = await self.sender.send(self.opts.predictions_topic, out.predictions)
                futures += await self.sender.send(self.opts.dead_letter_topic, out.dead_letters)
                # acks=all: once these resolve, every output of the batch is on the broker.
                await asyncio.gather(*futures)
                return
            except KafkaError as err:
                if attempt == DELIVERY_ATTEMPTS:
                    raise OutputsLost(
                        f"the broker did not take {len(out.predictions)} predictions and "
                        f"{len(out.dead_letters)} dead letters after {attempt} attempts ({err!r})"
                    ) from err
                log.warning(
                    "sending outputs failed (%r); retry %d in %.0fs", err, attempt, backoff_s
                )
                await asyncio.sleep(backoff_s)
                backoff_s *= 2

    def _compute(self, records: list[RawRecord]) -> Outputs:
        try:
            out = self.adapter.process(records, self.engine)
        except Exception as err:  # noqa: BLE001 - a poisoned batch must not stop the worker
            log.exception("the engine failed on a micro-batch of %d messages", len(records))
            out = self.adapter.reject_all(records, err)
        self._maybe_expire()
        return out

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire >= self.opts.expire_interval_s:
            self._last_expire = now
            expired = self.engine.pool.expire()
            if expired:
                log.info("expired %d idle keys (TTL %ss)", expired, self.opts.ttl_s)

    async def expire_when_idle(self) -> None:
        """Timer hook: expiry must also run when no batch arrives (on the engine thread)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._maybe_expire)

    def log_stats(self) -> None:
        s = self.sensor
        then, tokens_then = self._last_stats
        now = time.monotonic()
        rate = (s.tokens - tokens_then) / max(now - then, 1e-9)
        self._last_stats = (now, s.tokens)
        log.info(
            "partitions %s: %d messages, %d tokens (%.0f tokens/s lately), %d predictions, "
            "dead letters %s, %d keys resident",
            self.assigned, s.events, s.tokens, rate, s.predictions, dict(s.dead_letters),
            len(self.engine.pool),
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """What the status endpoint reports."""
        s = self.sensor
        return {
            "group": self.opts.group,
            "pid": os.getpid(),
            "model_version": self.engine.version,
            "assigned": self.assigned,
            "batches": s.batches,
            "messages": s.events,
            "tokens": s.tokens,
            "busy_s": round(s.seconds, 3),
            "predictions": s.predictions,
            "dead_letters": dict(s.dead_letters),
            "keys_resident": len(self.engine.pool),
            "keys_stored": len(self.store),
            "skipped_redelivered": s.skipped,
            "checkpoints": s.checkpoints,
            "checkpoint_records": s.checkpoint_records,
            "checkpoint_bytes": s.checkpoint_bytes,
            "checkpoint_seconds": round(s.checkpoint_seconds, 3),
            "restored_keys": s.restored_keys,
            "restore_seconds": round(s.restore_seconds, 3),
            "evictions": self.engine.pool.evictions,
            "pool_restores": self.engine.pool.restores,
        }

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()


def build_app(opts: WorkerOptions, worker: StreamWorker | None = None) -> faust.App:
    """The faust app of one worker process (not started); loads the model unless given one."""
    worker = worker or StreamWorker(opts)
    datadir = opts.worker_dir / f"{opts.group}-{os.getpid()}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        opts.group,  # the app id is the consumer group
        broker=f"kafka://{opts.bootstrap}",
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        # Topics are created by ensure_topics (with the state topic co-partitioned); faust
        # must neither declare them nor create its assignor leader topic.
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=opts.web_port is not None,
        web_port=opts.web_port or 6066,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, 2 * opts.max_batch),
        producer_acks=-1,
    )
    if opts.web_port is not None:
        app.web_server(StatusServer(worker.status, port=opts.web_port))
    topic = app.topic(
        opts.tokens_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    @app.agent(topic, name="tokens")
    async def process_tokens(stream: StreamT[bytes]) -> None:
        await worker.sender.start()
        await worker.writer.start()
        # noack: a micro-batch is acked only at the commit point, once the states it changed
        # are durable in the state topic (faust would otherwise ack it when the body returns)
        batches = cast(faust.Stream[bytes], cast(faust.Stream[bytes], stream).noack())
        async for events in batches.take_events(opts.max_batch, within=opts.max_wait_s):
            try:
                await worker.handle(events)
            except OutputsLost as err:
                # take_events acks a batch even when this body raises, which would commit
                # offsets whose outputs never reached the broker. Exit before that can happen:
                # the batch is redelivered to whoever owns the partitions next.
                log.critical("%s; exiting without acking the micro-batch", err)
                os._exit(EXIT_OUTPUTS_LOST)
            await worker.commit_point()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        worker.assigned = sorted(tp.partition for tp in assigned if tp.topic == opts.tokens_topic)
        # restore before the partitions' first events are processed (handle() checks again)
        await worker.durable.ensure_restored(worker.assigned)
        log.info(
            "worker %d assigned partitions %s of %s",
            os.getpid(),
            worker.assigned,
            opts.tokens_topic,
        )

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        gone = sorted(tp.partition for tp in revoked if tp.topic == opts.tokens_topic)
        worker.assigned = [p for p in worker.assigned if p not in gone]
        await worker.commit_point(force=True)  # everything processed so far becomes durable
        await worker.durable.release(gone)

    @app.timer(opts.expire_interval_s)
    async def expire_idle_keys() -> None:
        await worker.expire_when_idle()

    @app.timer(opts.stats_interval_s)
    async def log_stats() -> None:
        worker.log_stats()

    @app.on_before_shutdown.connect
    async def stop_sender(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await worker.commit_point(force=True)
        await worker.writer.stop()
        await worker.sender.stop()

    return app


def run_worker(opts: WorkerOptions, settings: Settings) -> int:
    """Create the topics if needed, then run one worker until SIGTERM/SIGINT; the exit code."""
    layout = ensure_topics(opts.bootstrap, opts.settings(settings), partitions=opts.partitions)
    worker = StreamWorker(opts)
    app = build_app(opts, worker)
    log.info(
        "worker %d: model %s on %s, group %r, %s (%d partitions) -> %s, %s",
        os.getpid(), worker.engine.version, worker.engine.device, opts.group, layout.tokens,
        layout.partitions, layout.predictions, layout.dead_letters,
    )  # fmt: skip
    faust_worker = faust.Worker(app, loglevel=opts.log_level, quiet=True, redirect_stdouts=False)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        worker.close()
        shutil.rmtree(opts.worker_dir / f"{opts.group}-{os.getpid()}", ignore_errors=True)
    return 0
