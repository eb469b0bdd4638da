"""The stream worker: a faust-streaming app with one agent on the tokens topic.

Per micro-batch (``take_batches(channel queue, max_batch, max_wait_s)``): raw records -> `Adapter`
(decode, validate, dead-letter) -> `Engine.process` (one batched step per phase) -> encoded
predictions and dead letters -> `OutputSender` (one broker batch per partition, acks=all). A
micro-batch's offsets are committed only at the next checkpoint after its outputs are on the
broker (see ``ACK POINT``): consumer offsets never pass a state that is not durable. The worker
commits them itself; faust's acks are off for the tokens topic, because faust acks every
message it skips (during a rebalance, or of an old group generation), so its commits could
pass tokens that no worker applied.

Rebalances: a revoked partition gets a final checkpoint, its offsets are committed and its keys
leave the pool; micro-batches wait while a rebalance is under way and, once the new assignment
is known and restored, process only the partitions it holds (see `StreamWorker.handle`).
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import faust
import torch
from aiokafka.errors import KafkaError
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP, EventT, StreamT

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.pool import StatePool
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.checkpoint import load_checkpoint
from stream_rnn.stream.adapter import Adapter, CountingSensor, Outputs, RawRecord
from stream_rnn.stream.batches import EventQueue, take_batches
from stream_rnn.stream.durable import DurableState, Snapshot
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.executor import engine_executor
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.state import StateWriter
from stream_rnn.stream.status import StatusServer
from stream_rnn.stream.topics import ensure_topics, state_topic

log = logging.getLogger("stream_rnn.worker")
DELIVERY_ATTEMPTS = 3
# EX_TEMPFAIL: a micro-batch failed after it may have changed states (the broker refused its
# outputs after every retry): the worker exits uncommitted; restart it.
EXIT_OUTPUTS_LOST = 75


async def _no_commit(offsets: dict[int, int]) -> bool:
    return False


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
    engine_thread: bool = False
    session_timeout_s: float = 60.0
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

    Every call that touches the state pool (process, expire, checkpoint snapshots, restores)
    goes through one executor: the event loop's own thread by default, or a dedicated thread
    (``engine_thread``); see `stream_rnn.stream.executor`.
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
        self._executor = engine_executor(opts.engine_thread)
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
        # Per partition, the offset after the last event processed since the last commit.
        self.uncommitted: dict[int, int] = {}
        # build_app points this at the consumer: commit {partition: offset}, True if done.
        self.commit_offsets: Callable[[dict[int, int]], Awaitable[bool]] = _no_commit
        # Set while the assignment is settled (known, and its partitions restored); cleared
        # from revocation until the next assignment. See handle().
        self.settled = asyncio.Event()
        # Held from ownership check to delivered outputs (handle) and around a checkpoint and
        # its commit (commit_point): a checkpoint never holds the effect of a micro-batch whose
        # predictions are not on the broker yet, and no commit passes one that it does not hold.
        self._batch_lock = asyncio.Lock()
        # The consumer group generation now (build_app points this at faust's): events fetched
        # in an earlier one are stale copies, see handle().
        self.generation: Callable[[], int | None] = lambda: None
        # The checkpoint being written in the background, if any (see commit_point).
        self._checkpointing: asyncio.Task[None] | None = None
        self._last_expire = time.monotonic()
        self._last_stats = (time.monotonic(), 0)

    async def handle(self, events: Sequence[EventT]) -> None:
        """Process one micro-batch and wait until its outputs are durable on the broker.

        Which partitions are ours is decided by the rebalance signals alone: faust resumes
        fetching a new assignment before ``on_partitions_assigned`` has run, so a batch waits
        until it has (the assignment is known and restored). Dropped, unacked: events of
        partitions not ours (their new owner's), and events fetched in an earlier group
        generation, which the batch buffer can still hold after a rebalance. After every
        assignment the consumer fetches again from the committed offsets, so such a copy is
        either fetched again in order or already applied; processing it could apply a token
        twice (with its refetched copy in the same batch) or before the tokens ahead of it.
        Within one generation a partition's events arrive in order and none is left out, so
        the offset after the last one processed is where a restart may resume.
        """
        await self.settled.wait()
        async with self._batch_lock:
            owned, generation = set(self.assigned), self.generation()
            events = [
                e
                for e in events
                if e.message.partition in owned
                and (generation is None or e.message.generation_id in (None, generation))
            ]
            if not events:
                return
            await self.durable.ensure_restored({e.message.partition for e in events})
            records = [
                RawRecord(m.key, m.value, m.topic, m.partition, m.offset, m.timestamp)
                for m in (e.message for e in events)
            ]
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, self._compute, records)
            await self.deliver(out)
            self.durable.add_tokens(out.tokens)
            for e in events:
                self.uncommitted[e.message.partition] = e.message.offset + 1

    async def commit_point(self, *, force: bool = False) -> None:
        """ACK POINT: commit the processed micro-batches' offsets once their states are durable.

        The changed states and the offsets of the micro-batches they hold are taken together,
        between two micro-batches; the states are then written (acks=all) and the offsets
        committed in the background while the next micro-batches run, one checkpoint at a
        time. ``force`` (revocation, shutdown) waits for the one in flight, then takes and
        writes a last one before it returns. With checkpoints off, a batch is committed as soon
        as its outputs are on the broker. A checkpoint that fails commits nothing; its states
        are written by the next one, and a commit that fails is tried again with the next.
        """
        if self._checkpointing is not None:
            if not force and not self._checkpointing.done():
                return
            await asyncio.wait([self._checkpointing])  # its failure was logged there
            self._checkpointing = None
        async with self._batch_lock:
            if not self.durable.enabled:
                offsets, self.uncommitted = self.uncommitted, {}
                snapshot = None
            else:
                if not (force or self.durable.due()):
                    return
                snapshot = await self.durable.snapshot()
                offsets, self.uncommitted = self.uncommitted, {}
        if force or snapshot is None:
            await self._write_and_commit(snapshot, offsets)
        else:
            self._checkpointing = asyncio.create_task(
                self._checkpoint_in_background(snapshot, offsets)
            )

    async def _checkpoint_in_background(self, snapshot: Snapshot, offsets: dict[int, int]) -> None:
        try:
            await self._write_and_commit(snapshot, offsets)
        except (KafkaError, StreamError) as err:
            log.warning("checkpoint failed (%r); retrying at the next commit point", err)
        except Exception:  # noqa: BLE001 - nothing was committed; the next checkpoint retries
            log.exception("checkpoint failed; retrying at the next commit point")

    async def _write_and_commit(self, snapshot: Snapshot | None, offsets: dict[int, int]) -> None:
        done = False
        try:
            if snapshot is not None:
                await self.durable.write(snapshot)
            if offsets:
                done = await self.commit_offsets(offsets)
            else:
                done = True
        finally:
            if not done:  # keep them (a newer offset of a partition supersedes its old one)
                self.uncommitted = {**offsets, **self.uncommitted}

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
        # No faust tables (states live in our state topic), so no standby replicas: with the
        # default of 1, faust's assignor keeps members at ceil(P / members) partitions, and a
        # third worker joining two on 4 partitions would get none.
        table_standby_replicas=0,
        stream_buffer_maxsize=max(4096, 2 * opts.max_batch),
        producer_acks=-1,
        # How long a killed worker keeps its partitions: the group moves them only once its
        # session expires, so this bounds the recovery time after a crash.
        broker_session_timeout=opts.session_timeout_s,
        broker_heartbeat_interval=min(3.0, opts.session_timeout_s / 3),
    )
    worker.generation = lambda: app.consumer_generation_id

    async def commit_offsets(offsets: dict[int, int]) -> bool:
        # faust's own commit path, minus its ack bookkeeping (off for the tokens topic);
        # offsets of partitions no longer assigned are left out (their new owner redoes them)
        tps = {TP(opts.tokens_topic, p): off for p, off in offsets.items()}
        return await cast(FaustConsumer, app.consumer)._commit_offsets(tps)

    worker.commit_offsets = commit_offsets
    if opts.web_port is not None:
        app.web_server(StatusServer(worker.status, port=opts.web_port))
    topic = app.topic(
        opts.tokens_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        acks=False,  # offsets are committed by commit_point, see the module docstring
    )

    @app.agent(topic, name="tokens")
    async def process_tokens(stream: StreamT[bytes]) -> None:
        await worker.sender.start()
        await worker.writer.start()
        # Micro-batches taken from the agent's channel queue in bulk (see stream/batches.py):
        # nothing is acked (acks are off for the topic); offsets are committed at commit_point.
        queue: EventQueue[EventT] = cast(Any, stream).channel.queue
        async for events in take_batches(queue, opts.max_batch, opts.max_wait_s):
            try:
                await worker.handle(events)
            except Exception as err:  # noqa: BLE001 - any failure here is fatal, see below
                # The batch's effect may be in the pool while its outputs are not all on the
                # broker (OutputsLost, or a bug): a later checkpoint would make that effect
                # durable and the redelivered tokens would then be skipped, their predictions
                # never sent. Exit uncommitted: the batch is redone by whoever owns it next.
                log.critical("%s; exiting without committing the micro-batch", err)
                os._exit(EXIT_OUTPUTS_LOST)
            await commit_or_retry()

    async def commit_or_retry() -> None:
        try:
            await worker.commit_point()
        except (KafkaError, StreamError) as err:
            # nothing was committed; the states are written by the next checkpoint
            log.warning("checkpoint failed (%r); retrying at the next commit point", err)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        worker.assigned = sorted(tp.partition for tp in assigned if tp.topic == opts.tokens_topic)
        # restore before the partitions' first events are processed (handle() waits for it)
        await worker.durable.ensure_restored(worker.assigned)
        worker.settled.set()
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
        worker.settled.clear()  # no new micro-batch until the next assignment is restored
        worker.assigned = [p for p in worker.assigned if p not in gone]
        # Everything processed so far becomes durable and committed while the partitions are
        # still ours: their next owner starts from these offsets.
        await worker.commit_point(force=True)
        for p in gone:  # not ours to commit any more (a failed commit is redone by the owner)
            worker.uncommitted.pop(p, None)
        await worker.durable.release(gone)

    @app.timer(min(opts.checkpoint_interval_s or 1.0, 1.0) / 2)
    async def commit_when_idle() -> None:
        # Without new micro-batches the last ones would wait for a checkpoint (and their
        # commit) until the next batch or shutdown.
        await commit_or_retry()

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
