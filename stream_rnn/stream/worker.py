"""The stream worker: a faust-streaming app with one agent on the tokens topic.

Per micro-batch (``take_batches(channel queue, max_batch, max_wait_s)``): raw records -> `Adapter`
(decode, validate, dead-letter) -> `Engine.process` (one batched step per phase) -> encoded
predictions and dead letters -> Kafka. What happens to them depends on the guarantee
(``--guarantee``), and the decisions live in `stream_rnn.stream.commit` (no I/O):

* **exactly-once** (default): outputs go into the open Kafka transaction of the input
  partition that caused them (`stream_rnn.stream.txn`, one transactional producer per owned
  partition, which fences earlier owners); every ``commit_interval_s`` each partition's
  transaction gets the records of the states it changed (tombstones for deleted keys) and the
  consumed offsets, and commits. A read_committed reader sees every output once.
* **at-least-once**: outputs are sent (acks=all) per micro-batch; the changed states are
  checkpointed every ``checkpoint_interval_s`` and only then are the micro-batches' offsets
  committed (see ``ACK POINT``). After a crash, outputs since the last checkpoint are sent
  again with the same ids.

The worker commits offsets itself; faust's acks are off for the tokens topic, because faust
acks every message it skips (during a rebalance, or of an old group generation), so its commits
could pass tokens that no worker applied. Every faust internal used is in
`stream_rnn.stream.faust_boundary`.

Rebalances: a revoked partition gets a final checkpoint, its offsets are committed and its keys
leave the pool; micro-batches wait while a rebalance is under way and, once the new assignment
is known and restored, process only the partitions it holds (see `StreamWorker.handle`).
Several workers with the same ``group`` share the tokens topic's partitions; each runs in its
own process (``stream-rnn worker``) with its own engine, its own faust data directory and, if
asked for, its own status port.

The worker is split by concern: `stream_rnn.stream.worker_options` (`WorkerOptions`),
`stream_rnn.stream.worker_commit` (outputs handed over and the commit points, `CommitMixin`),
this module (`StreamWorker`: rebalances, micro-batches, model swaps, housekeeping) and
`stream_rnn.stream.worker_app` (the faust app, `build_app`, and `run_worker`).

Example::

    from stream_rnn.stream.worker_app import run_worker
    from stream_rnn.stream.worker_options import WorkerOptions

    settings = get_settings()
    opts = WorkerOptions.from_settings("runs/lang", settings, group="g1", max_batch=512)
    run_worker(opts, settings)          # until SIGTERM / SIGINT
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import EventT

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.exceptions import PoolError
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.versions import SwapPolicy, check_policy
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest, load_checkpoint
from stream_rnn.registry.exceptions import CheckpointError, RegistryError, UpdateRejected
from stream_rnn.registry.updates import VerifiedUpdate
from stream_rnn.registry.versions import Registry
from stream_rnn.stream import faust_boundary as fb
from stream_rnn.stream.adapter import Adapter, Outputs, RawRecord
from stream_rnn.stream.commit import EXIT_SOFTWARE, CommitProtocol, Decision
from stream_rnn.stream.durable import DurableState
from stream_rnn.stream.executor import engine_executor
from stream_rnn.stream.memory import resident_bytes, trim_heap
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.sensors import CountingSensor, LiveFigures, MetricsServer
from stream_rnn.stream.state import StateWriter
from stream_rnn.stream.topics import state_topic
from stream_rnn.stream.txn import PartitionTransactions
from stream_rnn.stream.worker_commit import CommitMixin
from stream_rnn.stream.worker_options import WorkerOptions

__all__ = ["StreamWorker"]

log = logging.getLogger("stream_rnn.worker")


TRIM_IDLE_S = 1.0  # the heap is trimmed after this long without a micro-batch


async def _no_commit(offsets: dict[int, int]) -> bool:
    return False


def _exit_process(code: int) -> None:
    # no faust shutdown: nothing uncommitted may be committed on the way out
    logging.shutdown()
    os._exit(code)


class StreamWorker(CommitMixin):
    """The engine, adapter and Kafka clients of one process, and the micro-batch handler.

    Every call that touches the state pool (process, expire, checkpoint snapshots, restores)
    goes through one executor: the event loop's own thread by default, or a dedicated thread
    (``engine_thread``); see `stream_rnn.stream.executor`. Outputs, commit points and fatal
    decisions are in `CommitMixin` (`stream_rnn.stream.worker_commit`).
    """

    def __init__(
        self, opts: WorkerOptions, loaded: tuple[RecurrentModel, Manifest] | None = None
    ) -> None:
        """``loaded``: the model (and manifest) of ``opts.model_dir`` verified already (at a
        registry start-up), served as it is; else the checkpoint is loaded (and verified)."""
        self.opts = opts
        device = opts.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if loaded is not None:
            model, manifest = loaded[0].to(device).eval(), loaded[1]
        else:
            model, manifest = load_checkpoint(opts.model_dir, device=device)
        # Evicted states live in a local file (bounded memory); the state topic is the truth,
        # so the file starts empty with every process (and goes with it, see run_worker).
        self.workdir = opts.worker_dir / f"{opts.group}-{os.getpid()}"
        self.store = DiskStateStore(self.workdir / "states.db")
        pool = StatePool(
            model.config,
            opts.capacity,
            device=model.embedding.weight.device,
            storage=opts.storage,
            ttl_s=opts.ttl_s,
            retention_s=opts.state_retention_s,
            store=self.store,
            history=opts.history,
            swap_policy=opts.swap_policy,
        )
        self.engine = Engine(model, manifest, pool=pool, running_estimate=opts.running_estimate)
        self.sensor = CountingSensor()
        self.adapter = Adapter(
            unknown=opts.unknown_token,
            max_bytes=opts.max_message_bytes,
            max_tokens=opts.max_chunk_tokens,
            sensor=self.sensor,
        )
        self.exactly_once = opts.guarantee == "exactly-once"
        client_id = f"{opts.group}-{os.getpid()}"
        self.sender = OutputSender(opts.bootstrap, client_id=client_id)
        self.txns = PartitionTransactions(
            opts.bootstrap,
            group=opts.group,
            tokens_topic=opts.tokens_topic,
            client_id=client_id,
            floor=lambda p: self.protocol.floor.get(p, 0),
            read_committed=self._read_committed_one,
        )
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
            # exactly-once: every transaction holds its states; no separate checkpoints
            interval_s=0.0 if self.exactly_once else opts.checkpoint_interval_s,
            every_tokens=opts.checkpoint_every,
        )
        self._known_versions: set[str] = {self.engine.version}
        if opts.registry is not None:
            self.durable.on_versions = self._remember_versions
        interval = opts.commit_interval_s if self.exactly_once else opts.checkpoint_interval_s
        self.protocol = CommitProtocol(exactly_once=self.exactly_once, interval_s=interval or 1e-6)
        # build_app points these at faust: commit {partition: offset} (at-least-once), and
        # the group generation now (events fetched in an earlier one are stale copies)
        self.commit_offsets: Callable[[dict[int, int]], Awaitable[bool]] = _no_commit
        self.generation: Callable[[], int | None] = lambda: None
        # how a fatal decision ends the process (tests replace it)
        self.exit: Callable[[int], None] = _exit_process
        # Set while the assignment is settled (known, fenced and restored); cleared from
        # revocation until the next assignment. See handle().
        self.settled = asyncio.Event()
        # Held from the ownership check to the outputs handed over (handle), and around
        # taking a commit's states and offsets (commit_point): a commit never holds part of a
        # micro-batch.
        self._batch_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()  # one commit at a time
        # at-least-once: the checkpoint being written in the background, if any
        self._checkpointing: asyncio.Task[None] | None = None
        self.stopping = False
        self.closed = False
        # model swaps (registry mode): how many, the pause each caused, refusals by reason
        self.swaps: list[dict[str, Any]] = []
        # consumer lag per owned partition (high watermark - next offset), refreshed by a timer
        self.next_offsets: dict[int, int] = {}
        self.metrics_server: MetricsServer | None = None  # --metrics-port (see worker_app)
        self.lag: dict[int, int] = {}
        self._last_expire = time.monotonic()
        self._last_stats = (time.monotonic(), 0)
        self._last_batch = time.monotonic()  # when the last micro-batch ended
        self._trimmed_at = 0  # tokens processed when the heap was last trimmed
        self.heap_trims = 0

    # ------------------------------------------------------------------ clients
    async def start_clients(self) -> None:
        if not self.exactly_once:
            await self.sender.start()
            await self.writer.start()

    async def stop_clients(self) -> None:
        """After the last commit: close the producers (open transactions are aborted)."""
        self.closed = True
        await self.txns.close()
        await self.writer.stop()
        await self.sender.stop()

    # ------------------------------------------------------------------ rebalances
    async def on_assigned(self, partitions: list[int]) -> None:
        """New assignment: fence earlier owners, learn the committed offsets, restore states.

        The order matters under exactly-once: the transactional producers start first (which
        aborts whatever a previous owner left open), so the committed offsets and state records
        read next are final.
        """
        self.assigned = partitions
        self.sensor.on_rebalance(partitions, [])
        if self.exactly_once:
            await self.txns.open(partitions)
            committed = await self._read_committed(partitions)
        else:
            committed = {p: 0 for p in partitions}
        self.protocol.assigned(committed)
        await self.durable.ensure_restored(partitions)
        self.settled.set()

    async def on_revoked(self, partitions: list[int]) -> None:
        """Partitions taken away: commit what was processed while they are still ours, then
        forget their keys (their next owner restores them)."""
        self.settled.clear()  # no new micro-batch until the next assignment is settled
        self.assigned = [p for p in self.assigned if p not in partitions]
        self.sensor.on_rebalance([], partitions)
        for p in partitions:
            self.next_offsets.pop(p, None)
            self.lag.pop(p, None)
        await self.commit_point(force=True)
        self.protocol.revoked(partitions)
        await self.durable.release(partitions, checkpoint=not self.exactly_once)
        if self.exactly_once:
            await self.txns.close(partitions)

    async def _read_committed_one(self, partition: int) -> int:
        return (await self._read_committed([partition]))[partition]

    async def _read_committed(self, partitions: list[int]) -> dict[int, int]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.opts.bootstrap,
            group_id=self.opts.group,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            out = {}
            for p in partitions:
                offset = await consumer.committed(TopicPartition(self.opts.tokens_topic, p))
                out[p] = offset if offset is not None and offset >= 0 else 0
            return out
        finally:
            await consumer.stop()

    # ------------------------------------------------------------------ micro-batches
    async def handle(self, events: Sequence[EventT]) -> None:
        """Process one micro-batch and hand its outputs over (transaction or acks=all).

        Which partitions are ours is decided by the rebalance signals alone: faust resumes
        fetching a new assignment before ``on_partitions_assigned`` has run, so a batch waits
        until it has (the assignment is known, fenced and restored). Dropped, unacked: events
        of partitions not ours, events fetched in an earlier group generation, events below
        the committed offset and events already processed (`CommitProtocol.accept`).
        """
        await self.settled.wait()
        async with self._batch_lock:
            if self.stopping:
                return
            generation = self.generation()
            accept = self.protocol.accept
            kept: list[EventT] = []
            for e in events:
                gen = fb.event_generation(e)
                if generation is not None and gen is not None and gen != generation:
                    continue
                partition, offset = fb.event_position(e)
                if accept(partition, offset):
                    kept.append(e)
            if not kept:
                return
            records = [
                RawRecord(m.key, m.value, m.topic, m.partition, m.offset, m.timestamp)
                for m in (e.message for e in kept)
            ]
            last: dict[int, int] = {}
            for r in records:
                last[r.partition] = r.offset
            await self.durable.ensure_restored(last)
            loop = asyncio.get_running_loop()
            try:
                out = await loop.run_in_executor(self._executor, self._compute, records)
            except Exception as err:  # noqa: BLE001 - a bug in the engine, see crashed()
                log.exception("the engine failed on a micro-batch of %d messages", len(records))
                await self.fail(self.protocol.crashed(err))
                return
            await self.emit(out)
            self.durable.add_tokens(out.tokens)
            for partition, offset in last.items():
                self.protocol.processed(partition, offset)
                self.next_offsets[partition] = offset + 1
            self._last_batch = time.monotonic()

    def _compute(self, records: list[RawRecord]) -> Outputs:
        out = self.adapter.process(records, self.engine)
        if self.sensor.batches == self.opts.fault_engine_batch:
            # fault injection (tests, drills): fail after the batch changed the pool, the
            # worst moment for the guarantee
            raise RuntimeError(f"injected engine fault on micro-batch {self.sensor.batches}")
        self._maybe_expire()
        return out

    # ------------------------------------------------------------------ model swaps
    async def swap_model(self, verified: VerifiedUpdate) -> None:
        """Serve ``verified`` from the next micro-batch on, live states following its policy.

        Between two micro-batches (the batch lock is held throughout, so no batch sees two
        models); under exactly-once also at a transaction boundary: everything processed under
        the old model commits first, and the states the swap changes go into the next
        transactions under the new version. The pause is measured and reported.
        """
        update = verified.update
        # the commit lock first, then the batch lock: the order every commit takes them in (the
        # other order deadlocks with a revocation's commit)
        async with self._commit_lock, self._batch_lock:
            if self.stopping or self.closed:
                return
            paused = time.monotonic()
            if self.exactly_once:
                await self._commit_transactions(force=True, locks_held=True)
            try:
                report = await asyncio.get_running_loop().run_in_executor(
                    self._executor,
                    self.engine.swap,
                    verified.model,
                    verified.manifest,
                    verified.policy,
                )
            except Exception as err:  # noqa: BLE001 - the pool may be half converted: exit
                log.exception("swapping in model %s failed", update.version)
                await self.fail(
                    Decision(
                        f"swapping in model {update.version} failed ({err!r:.300}); the "
                        "states may be half converted, so nothing of them is committed: the "
                        "worker exits and its partitions resume from the last commit",
                        exit_code=EXIT_SOFTWARE,
                        abort=self.exactly_once,
                    )
                )
                return
            pause = time.monotonic() - paused
        self.sensor.on_swap(pause)
        self.follow_policy(update.policy)
        note = "; ".join(n for n in (verified.note, report.note) if n)
        self.swaps.append(
            {
                "from": report.from_version,
                "to": report.to_version,
                "policy_announced": update.policy,
                "policy": report.policy_applied,
                "keys_resident": report.keys_resident,
                "keys_stored": report.keys_stored,
                "pause_s": round(pause, 4),
                "note": note,
            }
        )
        log.info(
            "model %s -> %s swapped in (policy %s, %d resident keys converted, %d stored "
            "follow on admission; pause %.1f ms)%s",
            report.from_version, report.to_version, report.policy_applied,
            report.keys_resident, report.keys_stored, pause * 1000, f": {note}" if note else "",
        )  # fmt: skip

    def _remember_versions(self, versions: set[str]) -> None:
        """Restored states of versions this process never served: their checkpoints in the
        registry, verified as a swap verifies them (sha256, names, shapes, finite values),
        give the engine an exact keep check and a vocabulary map for a rewarm. A version that
        does not verify stays unknown: its states are never kept, only rewarmed or reset."""
        if self.opts.registry is None:
            return
        for version in versions - self._known_versions:
            self._known_versions.add(version)
            try:
                _, manifest = load_checkpoint(Registry(self.opts.registry).path(version))
            except (RegistryError, CheckpointError) as err:
                log.warning("restored states of model %s, which does not verify in the registry "
                            "(%s): they get the swap policy as an unknown version (no keep)",
                            version, err)  # fmt: skip
                continue
            self.engine.remember(manifest)

    def follow_policy(self, policy: str) -> None:
        """States restored from versions this process did not swap from get ``policy``, the
        one announced with the version served now, folded over the registry's promotions
        (`VersionBook.announce`), instead of the deployment's default."""
        book = self.engine.pool.book
        if book is None:
            return
        lineage: list[tuple[str, SwapPolicy]] = []
        if self.opts.registry is not None:
            try:
                history = Registry(self.opts.registry).swap_history()
                lineage = [(v, check_policy(p)) for v, p in history]
            except (RegistryError, PoolError) as err:
                log.warning("the registry's promotion history is unreadable (%s); restored "
                            "states get the announced policy %s", err, policy)  # fmt: skip
        book.announce(check_policy(policy), lineage)

    def update_rejected(self, err: UpdateRejected) -> None:
        """A refused model update: counted by reason (the current model keeps serving)."""
        self.sensor.on_update_rejected(err.reason)

    async def shutdown(self) -> None:
        """SIGTERM: stop taking micro-batches, let the one in flight finish, commit, close."""
        if self.closed:
            return
        async with self._batch_lock:
            self.stopping = True
        await self.commit_point(force=True)
        await self.stop_clients()

    # ------------------------------------------------------------------ housekeeping
    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire >= self.opts.expire_interval_s:
            self._last_expire = now
            expired = self.engine.pool.expire()
            if expired:
                log.info("expired %d idle keys from memory (TTL %ss)", expired, self.opts.ttl_s)
            retired = self.engine.pool.retire()
            if retired:
                log.info(
                    "deleted %d keys idle past the state retention (%ss)",
                    retired,
                    self.opts.state_retention_s,
                )

    async def expire_when_idle(self) -> None:
        """Timer hook: expiry must also run when no batch arrives (on the engine thread)."""
        async with self._batch_lock:
            if not self.stopping:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._maybe_expire)

    def trim_when_idle(self, idle_s: float = TRIM_IDLE_S) -> bool:
        """Timer hook: once per idle period (no micro-batch for ``idle_s`` after some tokens),
        give the heap's free pages back to the system (see stream/memory.py); whether it did."""
        tokens = self.sensor.tokens
        if tokens == self._trimmed_at or time.monotonic() - self._last_batch < idle_s:
            return False
        self._trimmed_at = tokens
        if trim_heap():
            self.heap_trims += 1
            return True
        return False

    def log_stats(self) -> None:
        s = self.sensor
        then, tokens_then = self._last_stats
        now = time.monotonic()
        rate = (s.tokens - tokens_then) / max(now - then, 1e-9)
        self._last_stats = (now, s.tokens)
        log.info(
            "partitions %s: %d messages, %d tokens (%.0f tokens/s lately), %d predictions, "
            "dead letters %s, %d keys resident, %d commits",
            self.assigned, s.events, s.tokens, rate, s.predictions, dict(s.dead_letters),
            len(self.engine.pool), s.commits,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """What the status endpoint reports."""
        s = self.sensor
        return {
            "group": self.opts.group,
            "pid": os.getpid(),
            "guarantee": self.opts.guarantee,
            "model_version": self.engine.version,
            "model_swaps": len(self.swaps),
            "last_swap": self.swaps[-1] if self.swaps else None,
            "model_updates_rejected": dict(s.updates_rejected),
            "startup_refusal": self.opts.startup_refusal,  # set by worker_app.start_from_registry
            "serving_fallback": self.opts.serving_fallback,
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
            "commits": s.commits,
            "transactions": s.transactions,
            "commit_failures": s.commit_failures,
            "commit_seconds": round(s.commit_seconds, 3),
            "checkpoints": s.checkpoints,
            "checkpoint_records": s.checkpoint_records,
            "checkpoint_bytes": s.checkpoint_bytes,
            "checkpoint_seconds": round(s.checkpoint_seconds, 3),
            "restored_keys": s.restored_keys,
            "restore_seconds": round(s.restore_seconds, 3),
            "evictions": self.engine.pool.evictions,
            "pool_restores": self.engine.pool.restores,
            "rebalances": s.rebalances,
            "rss_bytes": resident_bytes(),
            "heap_trims": self.heap_trims,
            "heap_trimmed_at_tokens": self._trimmed_at,  # the token count at the last trim
            "lag": dict(self.lag),
            # upper bounds of the histogram buckets that hold them (see /metrics for the rest)
            "latency_p50_s": s.latency.quantile(0.5),
            "latency_p99_s": s.latency.quantile(0.99),
        }

    def refresh_lag(self, highwaters: dict[int, int]) -> None:
        """Lag per owned partition from the consumer's high watermarks (timer hook)."""
        floor = self.protocol.floor
        for p in self.assigned:
            hw = highwaters.get(p)
            if hw is not None:
                self.lag[p] = max(0, hw - max(self.next_offsets.get(p, 0), floor.get(p, 0)))

    def live_figures(self) -> LiveFigures:
        """What /metrics reads at scrape time (from the metrics thread: reads only)."""
        pool = self.engine.pool
        return LiveFigures(
            active_keys=len(pool),
            state_bytes=pool.nbytes,
            stored_keys=len(self.store),
            evictions=pool.evictions,
            pool_restores=pool.restores,
            assigned=list(self.assigned),
            lag=dict(self.lag),
            model_version=self.engine.version,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
