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

Example::

    settings = get_settings()
    opts = WorkerOptions.from_settings("runs/lang", settings, group="g1", max_batch=512)
    run_worker(opts, settings)          # until SIGTERM / SIGINT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import faust
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import TP, EventT, StreamT

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.pool import StatePool
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.checkpoint import load_checkpoint, read_manifest
from stream_rnn.registry.exceptions import RegistryError, UpdateRejected
from stream_rnn.registry.updates import VerifiedUpdate, load_update_key
from stream_rnn.registry.versions import Registry
from stream_rnn.stream import faust_boundary as fb
from stream_rnn.stream.adapter import Adapter, CountingSensor, Outputs, RawRecord
from stream_rnn.stream.batches import consume_batches
from stream_rnn.stream.commit import (
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    CommitPlan,
    CommitProtocol,
    Decision,
)
from stream_rnn.stream.durable import DurableState, Snapshot
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.executor import engine_executor
from stream_rnn.stream.follow import ModelFollower, initial_model
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.state import StateWriter
from stream_rnn.stream.status import StatusServer
from stream_rnn.stream.topics import ensure_topics, state_topic
from stream_rnn.stream.txn import Fenced, PartitionTransactions

log = logging.getLogger("stream_rnn.worker")
# EX_TEMPFAIL: the worker exits uncommitted (outputs lost, fenced, broker gone); restart it.
EXIT_OUTPUTS_LOST = EXIT_TEMPFAIL


async def _no_commit(offsets: dict[int, int]) -> bool:
    return False


def _exit_process(code: int) -> None:
    # no faust shutdown: nothing uncommitted may be committed on the way out
    logging.shutdown()
    os._exit(code)


class OutputsLost(StreamError):
    """The broker did not take a micro-batch's outputs within the broker timeout."""


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
    max_chunk_tokens: int = 256
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
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 3.0
    guarantee: Literal["exactly-once", "at-least-once"] = "exactly-once"
    commit_interval_s: float = 0.1
    state_retention_s: float | None = None
    broker_timeout_s: float = 120.0
    fault_engine_batch: int | None = None
    web_port: int | None = None
    worker_dir: Path = Path("/tmp/stream-rnn-worker")  # noqa: S108 - overridden by settings
    log_level: str = "INFO"
    # the learning loop: serve the registry's production version and follow its announcements
    registry: Path | None = None
    update_key_file: Path | None = None
    model_updates_topic: str = "stream-rnn.model-updates"
    history: int = 0  # tokens kept per key for a rewarm after a swap (0: off)
    swap_policy: Literal["keep", "reset", "rewarm"] | None = None  # restores across versions

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
        if "registry" not in settings.model_fields_set:
            names.discard("registry")  # the default directory is not a request to follow it
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
    """The engine, adapter and Kafka clients of one process, and the micro-batch handler.

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
            self.engine.vocab,
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
        self.updates_rejected: Counter[str] = Counter()
        self._last_expire = time.monotonic()
        self._last_stats = (time.monotonic(), 0)

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

    def _compute(self, records: list[RawRecord]) -> Outputs:
        out = self.adapter.process(records, self.engine)
        if self.sensor.batches == self.opts.fault_engine_batch:
            # fault injection (tests, drills): fail after the batch changed the pool, the
            # worst moment for the guarantee
            raise RuntimeError(f"injected engine fault on micro-batch {self.sensor.batches}")
        self._maybe_expire()
        return out

    async def emit(self, out: Outputs) -> None:
        """Exactly-once: into the source partitions' transactions; else `deliver`."""
        if not self.exactly_once:
            await self.deliver(out)
            return
        try:
            # a full producer buffer waits for the broker: never longer than the timeout
            await asyncio.wait_for(self._send_in_transactions(out), self.opts.broker_timeout_s)
        except (KafkaError, StreamError, TimeoutError) as err:
            if isinstance(err, TimeoutError):
                err = StreamError(
                    f"the broker did not take the outputs within "
                    f"{self.opts.broker_timeout_s:.0f}s (--broker-timeout)"
                )
            await self.fail(self.protocol.lost(err, fenced=isinstance(err, Fenced)))

    async def _send_in_transactions(self, out: Outputs) -> None:
        for partition, (preds, dead) in out.by_source().items():
            await self.txns.send(partition, self.opts.predictions_topic, preds)
            await self.txns.send(partition, self.opts.dead_letter_topic, dead)

    async def deliver(self, out: Outputs, *, backoff_s: float = 1.0) -> None:
        """At-least-once: send the outputs and wait for their acks (acks=all); retry the whole
        set while the broker is unreachable, up to ``broker_timeout_s`` (duplicates are fine:
        readers dedupe by id); then exit uncommitted."""
        deadline = time.monotonic() + self.opts.broker_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                futures = await self.sender.send(self.opts.predictions_topic, out.predictions)
                futures += await self.sender.send(self.opts.dead_letter_topic, out.dead_letters)
                await asyncio.gather(*futures)
                return
            except KafkaError as err:
                if time.monotonic() + backoff_s > deadline:
                    await self.fail(
                        Decision(
                            f"the broker did not take {len(out.predictions)} predictions and "
                            f"{len(out.dead_letters)} dead letters within "
                            f"{self.opts.broker_timeout_s:.0f}s (--broker-timeout; {attempt} "
                            f"attempts, last: {err!r}); exiting without committing the "
                            "micro-batch: check the broker, then restart the worker",
                            exit_code=EXIT_TEMPFAIL,
                        )
                    )
                    return
                log.warning("sending outputs failed (%r); retry in %.0fs", err, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)

    async def fail(self, decision: Decision) -> None:
        """Act on a `Decision` of the protocol: log a retry, or abort and exit."""
        if not decision.exits:
            log.warning("%s", decision.message)
            return
        self.sensor.commit_failures += 1
        log.critical("%s", decision.message)
        if decision.abort:
            await self.txns.abort_all()
        self.exit(decision.exit_code or EXIT_TEMPFAIL)

    # ------------------------------------------------------------------ commits
    async def commit_point(self, *, force: bool = False) -> None:
        """ACK POINT: commit what was processed, as the guarantee says (module docstring).

        ``force`` (revocation, shutdown) commits whatever is pending now and waits for it.
        """
        if self.closed:
            return
        if self.exactly_once:
            await self._commit_transactions(force)
        else:
            await self._checkpoint_and_commit(force)

    async def _commit_transactions(self, force: bool, *, locks_held: bool = False) -> None:
        """One commit round. ``locks_held``: the caller holds the commit lock and then the
        batch lock, in that order (a model swap commits everything before it, with no
        micro-batch in between); every path takes them in that order, never the other."""
        if not force and self._commit_lock.locked():
            return  # one in flight; the next is due after it
        async with contextlib.nullcontext() if locks_held else self._commit_lock:
            started = time.monotonic()
            async with contextlib.nullcontext() if locks_held else self._batch_lock:
                extra = self.durable.has_changes() or any(
                    self.txns.is_open(p) for p in self.txns.partitions
                )
                if not (force and (self.protocol.pending or extra)) and not self.protocol.due(
                    extra=extra
                ):
                    return
                plan = self.protocol.begin(force=force)
                try:
                    owned = [p for p in self.txns.partitions if p in self.protocol.owned]
                    changes = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.durable.take_changes, owned
                    )
                    todo = sorted(
                        p
                        for p in owned
                        if p in plan.offsets or p in changes or self.txns.is_open(p)
                    )
                    # What the commit holds is fixed here; micro-batches may run while it is
                    # under way (their outputs wait for the next transaction of their partition).
                    self.txns.prepare_commit(todo)
                except BaseException as err:
                    await self._commit_broke(plan, err)
                    raise
            try:
                sizes = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            self.txns.commit(
                                p,
                                self.durable.state_topic,
                                changes[p].states if p in changes else [],
                                changes[p].deleted if p in changes else [],
                                plan.offsets.get(p),
                            )
                            for p in todo
                        )
                    ),
                    self.opts.broker_timeout_s,
                )
            except (KafkaError, StreamError, TimeoutError) as err:
                if isinstance(err, TimeoutError):
                    err = StreamError(
                        f"the broker did not complete the transactions within "
                        f"{self.opts.broker_timeout_s:.0f}s (--broker-timeout)"
                    )
                await self.fail(self.protocol.failed(plan, err, fenced=isinstance(err, Fenced)))
                return
            except BaseException as err:
                await self._commit_broke(plan, err)
                raise
            self.protocol.succeeded(plan)
            s = self.sensor
            s.commits += 1
            s.transactions += len(todo)
            s.commit_seconds += time.monotonic() - started
            s.checkpoint_records += sum(len(c.states) + len(c.deleted) for c in changes.values())
            s.checkpoint_bytes += sum(sizes)

    async def _commit_broke(self, plan: CommitPlan, err: BaseException) -> None:
        """A commit ended by something unexpected (a bug, or a cancellation): the plan still
        ends, so no later commit meets a stale one, and the worker exits (exactly-once:
        aborted, what the transactions hold is unknown now) unless it is stopping anyway."""
        self.protocol.failed(plan, err)
        bug = isinstance(err, Exception)
        if bug or (self.exactly_once and not self.stopping):
            if bug:
                log.exception("the commit failed unexpectedly")
            await self.fail(
                Decision(
                    f"the commit failed unexpectedly ({err!r:.300}); the open transactions are "
                    "aborted and the worker exits: the next owner resumes from the last "
                    "committed transaction (report the error if it repeats)",
                    exit_code=EXIT_SOFTWARE if bug else EXIT_TEMPFAIL,
                    abort=self.exactly_once,
                )
            )

    async def _checkpoint_and_commit(self, force: bool) -> None:
        task = self._checkpointing
        if task is not None:
            if not force and not task.done():
                return
            await asyncio.wait([task])  # its outcome was handled there
            self._checkpointing = None
        async with self._batch_lock:
            if not self.protocol.ready():
                if not force:
                    return
                self.protocol.skip_backoff()
            if not force:
                if self.durable.enabled:
                    if not (self.durable.due() or self.durable.has_changes()):
                        return
                elif not self.protocol.pending:
                    return
            plan = self.protocol.begin(force=force)
            try:
                snapshot = await self.durable.snapshot() if self.durable.enabled else None
            except BaseException as err:
                await self._commit_broke(plan, err)
                raise
        if force or snapshot is None:
            await self._write_and_commit(plan, snapshot)
        else:
            self._checkpointing = asyncio.create_task(self._write_and_commit(plan, snapshot))

    async def _write_and_commit(self, plan: CommitPlan, snapshot: Snapshot | None) -> None:
        async with self._commit_lock:
            try:
                if snapshot is not None:
                    await self.durable.write(snapshot)
                if plan.offsets:
                    owned = {p: o for p, o in plan.offsets.items() if p in self.protocol.owned}
                    if owned and not await self.commit_offsets(owned):
                        raise StreamError(f"the offset commit of {owned} was not accepted")
            except (KafkaError, StreamError, OSError) as err:
                await self.fail(self.protocol.failed(plan, err))
                return
            except BaseException as err:
                await self._commit_broke(plan, err)
                raise
            self.protocol.succeeded(plan)
            self.sensor.commits += 1

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
        """Restored states of versions this process never served: their manifests from the
        registry give the engine an exact keep check and a vocabulary map for a rewarm."""
        if self.opts.registry is None:
            return
        for version in versions - self._known_versions:
            self._known_versions.add(version)
            try:
                manifest = read_manifest(Registry(self.opts.registry).path(version))
            except RegistryError as err:
                log.warning("restored states of model %s, not in the registry (%s): they get "
                            "the swap policy as an unknown version", version, err)  # fmt: skip
                continue
            self.engine.remember(manifest)

    def update_rejected(self, err: UpdateRejected) -> None:
        """A refused model update: counted by reason (the current model keeps serving)."""
        self.updates_rejected[err.reason] += 1

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
            "model_updates_rejected": dict(self.updates_rejected),
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
        broker_heartbeat_interval=min(opts.heartbeat_interval_s, opts.session_timeout_s / 3),
    )
    worker.generation = lambda: fb.generation_id(app)

    async def commit_offsets(offsets: dict[int, int]) -> bool:
        return await fb.commit_offsets(app, opts.tokens_topic, offsets)

    worker.commit_offsets = commit_offsets
    if opts.web_port is not None:

        def status() -> dict[str, Any]:
            stats = fb.bulk_stats(app)
            return {**worker.status(), "consume": stats.as_dict() if stats else None}

        app.web_server(StatusServer(status, port=opts.web_port))
    topic = app.topic(
        opts.tokens_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        acks=False,  # offsets are committed by commit_point, see the module docstring
    )
    # Fetched record batches of the tokens topic go to the agent's queue in bulk, not through
    # faust's per-message wait_first (flow control and rebalances kept: see faust_boundary).
    fb.use_bulk_consumer(app, [opts.tokens_topic])

    @app.agent(topic, name="tokens")
    async def process_tokens(stream: StreamT[bytes]) -> None:
        await worker.start_clients()
        # Micro-batches taken from the agent's channel queue in bulk (see stream/batches.py):
        # nothing is acked (acks are off for the topic); offsets are committed at commit_point,
        # started in the background after each batch so that a commit never holds up the next.
        await consume_batches(
            fb.channel_queue(stream),
            opts.max_batch,
            opts.max_wait_s,
            worker.handle,
            worker.commit_point,
            stopping=lambda: worker.stopping,
        )

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        partitions = sorted(tp.partition for tp in assigned if tp.topic == opts.tokens_topic)
        await worker.on_assigned(partitions)
        log.info(
            "worker %d assigned partitions %s of %s", os.getpid(), partitions, opts.tokens_topic
        )

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        await worker.on_revoked(
            sorted(tp.partition for tp in revoked if tp.topic == opts.tokens_topic)
        )

    tick = min(opts.commit_interval_s if worker.exactly_once else 1.0, 1.0) / 2

    @app.timer(tick)
    async def commit_when_idle() -> None:
        # Without new micro-batches the last ones would wait for their commit until the next
        # batch or shutdown.
        await worker.commit_point()

    @app.timer(opts.expire_interval_s)
    async def expire_idle_keys() -> None:
        await worker.expire_when_idle()

    @app.timer(opts.stats_interval_s)
    async def log_stats() -> None:
        worker.log_stats()

    if opts.registry is not None:
        key = load_update_key(opts.update_key_file) if opts.update_key_file else None
        follower = ModelFollower(
            opts.bootstrap,
            opts.model_updates_topic,
            key=key,
            current=lambda: worker.engine.manifest,
            apply=worker.swap_model,
            rejected=worker.update_rejected,
            client_id=f"{opts.group}-{os.getpid()}-models",
            device=str(worker.engine.device),
        )

        @app.task
        async def follow_models() -> None:
            await follower.run()

    @app.on_before_shutdown.connect
    async def stop_worker(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await worker.shutdown()

    return app


def run_worker(opts: WorkerOptions, settings: Settings) -> int:
    """Create the topics if needed, then run one worker until SIGTERM/SIGINT; the exit code."""
    layout = ensure_topics(opts.bootstrap, opts.settings(settings), partitions=opts.partitions)
    for mismatch in fb.check_versions():
        log.warning("untested version: %s; the worker relies on its internals", mismatch)
    if opts.registry is not None:
        key = load_update_key(opts.update_key_file) if opts.update_key_file else None
        model_dir, where = initial_model(
            opts.registry, opts.bootstrap, opts.model_updates_topic, key=key
        )
        log.info("serving %s (%s); following %s", model_dir, where, opts.model_updates_topic)
        opts = replace(opts, model_dir=model_dir)
    removed = remove_stale_dirs(opts.worker_dir)
    if removed:
        log.info("removed %d local state files of workers that are gone", removed)
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


def remove_stale_dirs(worker_dir: Path) -> int:
    """Remove the local directories (``<group>-<pid>``) of worker processes that no longer run.

    A worker removes its own at exit; one that was killed cannot, and its evicted-state cache
    would stay on disk forever. The state topic is the truth, so nothing is lost.
    """
    removed = 0
    if not worker_dir.is_dir():
        return 0
    for path in worker_dir.iterdir():
        pid_text = path.name.rpartition("-")[2]
        if not path.is_dir() or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
