"""The worker's output and commit path: outputs handed over, commit points, fatal decisions.

`CommitMixin` is the half of `stream_rnn.stream.worker.StreamWorker` that acts on the decisions
of `stream_rnn.stream.commit.CommitProtocol` (which does no I/O): outputs go into the source
partitions' transactions (exactly-once) or are sent and acked (at-least-once, `deliver`);
`commit_point` commits what was processed (transactions with states and offsets, or a checkpoint
then the offsets); `fail` logs a retry or aborts and exits. The attributes it declares are set
by `StreamWorker.__init__`.

Locks, always taken in this order when both are held: the commit lock (one commit at a time),
then the batch lock (held from a micro-batch's ownership check to its outputs handed over, and
around taking a commit's states and offsets, so a commit never holds part of a micro-batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from aiokafka.errors import KafkaError

from stream_rnn.stream.adapter import Outputs
from stream_rnn.stream.commit import (
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    CommitPlan,
    CommitProtocol,
    Decision,
)
from stream_rnn.stream.durable import DurableState, Snapshot
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.sender import OutputSender
from stream_rnn.stream.sensors import CountingSensor
from stream_rnn.stream.txn import Fenced, PartitionTransactions
from stream_rnn.stream.worker_options import WorkerOptions

__all__ = ["EXIT_OUTPUTS_LOST", "CommitMixin", "OutputsLost"]

log = logging.getLogger("stream_rnn.worker")
# EX_TEMPFAIL: the worker exits uncommitted (outputs lost, fenced, broker gone); restart it.
EXIT_OUTPUTS_LOST = EXIT_TEMPFAIL


class OutputsLost(StreamError):
    """The broker did not take a micro-batch's outputs within the broker timeout."""


class CommitMixin:
    """Outputs, commit points and fatal decisions of a `StreamWorker` (module docstring)."""

    # set by StreamWorker.__init__
    opts: WorkerOptions
    exactly_once: bool
    sensor: CountingSensor
    sender: OutputSender
    txns: PartitionTransactions
    durable: DurableState
    protocol: CommitProtocol
    commit_offsets: Callable[[dict[int, int]], Awaitable[bool]]
    exit: Callable[[int], None]
    stopping: bool
    closed: bool
    _executor: Executor
    _batch_lock: asyncio.Lock
    _commit_lock: asyncio.Lock
    _checkpointing: asyncio.Task[None] | None
    # at-least-once: the last micro-batch's outputs, sent and not yet known to be acked
    _unacked: tuple[Outputs, list[asyncio.Future[object]]] | None = None

    # ------------------------------------------------------------------ outputs
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

    async def deliver(self, out: Outputs) -> None:
        """At-least-once: send the outputs (acks=all) without waiting for their acks, once the
        previous micro-batch's are in (`settle_deliveries`): the broker's round trip overlaps
        the next micro-batch instead of holding it, one batch deep, and outputs still reach the
        topic in batch order. Every commit settles first, so no offset is committed before the
        outputs of the events below it are acked."""
        await self.settle_deliveries()
        # Acks that are already in (and a queue that is never empty while a backlog drains)
        # would let micro-batches follow one another without the event loop running anything
        # else: the status and metrics endpoints and the timers would starve. Yield once.
        await asyncio.sleep(0)
        if self.closed:
            return
        try:
            futures = await self.sender.send(self.opts.predictions_topic, out.predictions)
            futures += await self.sender.send(self.opts.dead_letter_topic, out.dead_letters)
        except KafkaError as err:
            log.warning("sending outputs failed (%r); retrying", err)
            await self._deliver_acked(out)
            return
        self._unacked = (out, futures)

    async def settle_deliveries(self) -> None:
        """Wait for the acks of the outputs sent last; resend them (and wait) if the broker
        failed them, as `_deliver_acked` does."""
        pending, self._unacked = self._unacked, None
        if pending is None:
            return
        out, futures = pending
        try:
            await asyncio.gather(*futures)
        except KafkaError as err:
            log.warning("outputs were not acked (%r); sending them again", err)
            await self._deliver_acked(out)

    async def _deliver_acked(self, out: Outputs, *, backoff_s: float = 1.0) -> None:
        """Send the outputs and wait for their acks; retry the whole set while the broker is
        unreachable, up to ``broker_timeout_s`` (duplicates are fine: readers dedupe by id);
        then exit uncommitted."""
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
        self.sensor.on_commit_failure()
        if not decision.exits:
            log.warning("%s", decision.message)
            return
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
            self.sensor.on_commit(
                time.monotonic() - started,
                len(todo),
                sum(len(c.states) + len(c.deleted) for c in changes.values()),
                sum(sizes),
            )

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
            # nothing is committed before the outputs of what it covers are acked
            await self.settle_deliveries()
            if self.closed:
                return
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
            started = time.monotonic()
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
            self.sensor.on_commit(time.monotonic() - started, 0, 0, 0)
