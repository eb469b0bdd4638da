"""Crash-proof state for a worker: restore on assignment, incremental checkpoints, late commits.

Under exactly-once the worker takes each partition's changes with `DurableState.take_changes`
and commits them in that partition's transaction (`stream_rnn.stream.txn`); what follows is the
at-least-once path, which keeps the exactly-once *effect on state* (the Kafka Streams recipe,
without faust's ``exactly_once`` mode):

* every state carries the source offset of the last event applied to it; the engine skips
  events at or below it, so redeliveries after a crash or rebalance never apply twice;
* every ``checkpoint_interval_s`` seconds (or ``checkpoint_every`` tokens) the states changed
  since the last checkpoint — resident ones and ones evicted meanwhile — are written to the
  compacted state topic (co-partitioned with the tokens topic) and acknowledged by the broker
  (acks=all); only then are the offsets of the micro-batches they include committed (by the
  worker, see `stream_rnn.stream.worker`), so consumer offsets never pass what is durable; a
  checkpoint covers only micro-batches whose predictions are already on the broker;
* a worker that gets a partition restores its keys from that partition of the state topic
  before it processes any of the partition's events (the newest record per key by applied
  offset, loaded still encoded into the on-disk store); a revoked partition gets a last
  checkpoint and leaves the pool.

At-least-once predictions: tokens processed after the last checkpoint are processed again after
a crash and their predictions sent again, with the same ``partition:offset`` id. Deleted keys
(``end``, retention) are written as tombstones by the same checkpoint or transaction.
The chaos tests (``tests/chaos``) hold this to the offline pass through kills, rebalances, a
broker restart and 40,000 keys through a pool of 1,000.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any, NamedTuple, TypeVar

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.store import StoredState
from stream_rnn.stream.sensors import Sensor
from stream_rnn.stream.state import EncodedState, StateWriter, read_partition

log = logging.getLogger("stream_rnn.worker")
T = TypeVar("T")


class Changes(NamedTuple):
    """What one partition's next checkpoint or transaction writes."""

    states: Sequence[tuple[str, StoredState]]  # a list, or DirtyStates (made when read)
    deleted: list[tuple[str, int]]  # (key, source offset that deleted it): tombstones


class Snapshot(NamedTuple):
    """Changes taken for a checkpoint, per source partition, and when they were taken."""

    by_partition: dict[int, Changes]
    taken: float


class DurableState:
    """Checkpoints and restores of one worker's engine; all pool access on ``executor``.

    Example::

        durable = DurableState(engine, store, writer, bootstrap, state_topic, executor, sensor)
        await durable.ensure_restored({0, 2})
        ...process a micro-batch...
        if durable.due(tokens_since):
            await durable.checkpoint()
    """

    def __init__(
        self,
        engine: Engine,
        store: DiskStateStore,
        writer: StateWriter,
        bootstrap: str,
        state_topic: str,
        executor: Executor,
        sensor: Sensor,
        *,
        interval_s: float = 2.0,
        every_tokens: int = 50_000,
    ) -> None:
        self.engine, self.store, self.writer = engine, store, writer
        self.bootstrap, self.state_topic = bootstrap, state_topic
        self.executor, self.sensor = executor, sensor
        self.interval_s, self.every_tokens = interval_s, every_tokens
        self.restored: set[int] = set()
        self._last = time.monotonic()
        self._tokens = 0
        self._lock = asyncio.Lock()
        # States taken for a checkpoint that failed: no longer dirty in the pool, so the next
        # checkpoint must write them from here (per partition, newest per key).
        # (a deleted key maps to the offset that deleted it)
        self._retry: dict[int, dict[str, StoredState | int]] = defaultdict(dict)
        # told the model versions named by restored states (on the engine's thread), so that
        # the worker can teach the engine versions it never served (see Engine.remember)
        self.on_versions: Callable[[set[str]], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    async def _on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ restore
    async def ensure_restored(self, partitions: Iterable[int]) -> None:
        """Restore every partition in ``partitions`` not restored yet (before using its keys)."""
        missing = sorted(set(partitions) - self.restored)
        if not missing:
            return
        async with self._lock:
            for partition in missing:
                if partition in self.restored:
                    continue
                started = time.monotonic()
                states = await read_partition(self.bootstrap, self.state_topic, partition)
                loaded = await self._on_engine(self._load, states)
                self.restored.add(partition)
                seconds = time.monotonic() - started
                self.sensor.on_restore(loaded, seconds)
                log.info(
                    "restored %d key states of partition %d in %.2fs", loaded, partition, seconds
                )

    def _load(self, states: dict[str, EncodedState]) -> int:
        pool, slot_of = self.engine.pool, self.engine.pool.slot_of
        rows = []
        for key, state in states.items():
            if key in slot_of:
                # Only a leftover can be resident before its partition is restored; as
                # everywhere, the higher applied offset wins (a stale copy never shadows the
                # state its newer owner checkpointed).
                if int(pool.applied[slot_of[key]]) >= state.offset:
                    continue
                pool.discard(key)
            rows.append((key, state.partition, state.value, state.ts))
        if self.on_versions is not None:
            self.on_versions({s.version for s in states.values() if s.version})
        # into the on-disk store, still encoded: keys come into the pool when they return
        self.store.put_restored_encoded(rows)
        return len(rows)

    # ------------------------------------------------------------------ checkpoints
    def add_tokens(self, n: int) -> None:
        self._tokens += n

    def due(self) -> bool:
        if not self.enabled:
            return False
        return time.monotonic() - self._last >= self.interval_s or self._tokens >= self.every_tokens

    async def checkpoint(self, partitions: Iterable[int] | None = None) -> int:
        """Write every changed state (of ``partitions``, or all) durably; returns how many.

        If a write fails, the states not known to be durable are kept and written by the next
        checkpoint (they are no longer dirty in the pool), and the error propagates.
        """
        async with self._lock:
            return await self._checkpoint(partitions)

    async def snapshot(self) -> Snapshot:
        """Take every changed state now (marking them clean), to `write` later.

        The worker takes it while no micro-batch runs, together with the offsets it covers,
        and writes it while the next micro-batches run (see `StreamWorker.commit_point`).
        """
        async with self._lock:
            return await self._take(None)

    async def write(self, snapshot: Snapshot) -> int:
        """Write a `snapshot` durably (as `checkpoint` does); returns how many states."""
        async with self._lock:
            return await self._write(snapshot)

    async def _checkpoint(self, partitions: Iterable[int] | None) -> int:
        wanted = set(partitions) if partitions is not None else None
        return await self._write(await self._take(wanted))

    async def _take(self, wanted: set[int] | None) -> Snapshot:
        started = time.monotonic()
        by_part = await self._on_engine(self._collect, wanted)
        # the next checkpoint is due counting from now (tokens that arrive while this one is
        # written belong to the next)
        self._last, self._tokens = time.monotonic(), 0
        return Snapshot(by_part, started)

    async def _write(self, snapshot: Snapshot) -> int:
        by_part, started = snapshot
        written = 0
        before = self.writer.bytes
        todo = sorted(by_part.items())
        try:
            while todo:
                partition, changes = todo[0]
                written += await self.writer.write(partition, changes.states, changes.deleted)
                todo.pop(0)
        except BaseException:
            # A partly written partition is written again; compaction keeps the newest.
            for partition, changes in todo:
                self._keep_for_retry(partition, changes)
            raise
        self.sensor.on_checkpoint(written, self.writer.bytes - before, time.monotonic() - started)
        return written

    def _keep_for_retry(self, partition: int, changes: Changes) -> None:
        kept = self._retry[partition]
        for key, state in changes.states:
            old = kept.get(key)
            if old is None or (isinstance(old, StoredState) and state.offset >= old.offset):
                kept[key] = state
        for key, offset in changes.deleted:
            old = kept.get(key)
            if old is None or isinstance(old, int) or old.offset <= offset:
                kept[key] = offset

    def take_changes(self, partitions: Iterable[int]) -> dict[int, Changes]:
        """Every change of ``partitions`` since the last call (states and deletions), marking
        them taken: what one transaction per partition writes (exactly-once). On the engine's
        executor thread or while nothing else touches the pool."""
        return dict(self._collect(set(partitions)))

    def has_changes(self) -> bool:
        """Whether something besides processed events awaits a commit (deletions, retries)."""
        return bool(self.engine.pool.deleted) or bool(self._retry)

    def _collect(self, wanted: set[int] | None) -> dict[int, Changes]:
        retry_states: list[tuple[str, StoredState]] = []
        retried_deletions: list[tuple[str, int, int]] = []
        for p in [p for p in list(self._retry) if wanted is None or p in wanted]:
            for key, kept in self._retry.pop(p).items():
                if isinstance(kept, StoredState):
                    retry_states.append((key, kept))
                else:
                    retried_deletions.append((key, p, kept))
        pool = self.engine.pool
        # per source partition (-1: states that never saw an offset, exactly-once off: taken,
        # never written); copied now, the per-key states made when written (engine/dirty.py)
        parts = sorted(wanted) if wanted is not None else pool.dirty_partitions()
        dirty = {p: pool.take_dirty(partition=p) for p in parts}
        pending = (
            self.store.take_pending()
            if wanted is None
            else [kv for p in sorted(wanted) for kv in self.store.take_pending(partition=p)]
        )
        deletions = (
            pool.take_deleted()
            if wanted is None
            else [d for p in sorted(wanted) for d in pool.take_deleted(partition=p)]
        )
        gone = [*retried_deletions, *deletions]
        if not pending and not retry_states and not gone:
            # the usual checkpoint: the pool's changed states only, one per key already; the
            # micro-batches wait while it is taken, so nothing is made per key here
            return {p: Changes(states, []) for p, states in dirty.items() if p >= 0 and states}
        # One record per key, the newest: a key evicted (pending) and re-admitted since the last
        # checkpoint is in both lists, and compaction keeps whichever is written last.
        newest: dict[str, StoredState] = {}
        for key, state in [*(kv for states in dirty.values() for kv in states), *pending,
                           *retry_states]:  # fmt: skip
            old = newest.get(key)
            if old is None or state.offset >= old.offset:
                newest[key] = state
        states_of: dict[int, list[tuple[str, StoredState]]] = defaultdict(list)
        deleted_of: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for key, state in newest.items():
            if state.partition >= 0:  # -1: never saw an offset (exactly-once off)
                states_of[state.partition].append((key, state))
        for key, partition, offset in gone:
            # a key deleted and then created again is written as its new state only
            if partition >= 0 and key not in newest:
                deleted_of[partition].append((key, offset))
        return {
            p: Changes(states_of.get(p, []), deleted_of.get(p, []))
            for p in sorted(set(states_of) | set(deleted_of))
        }

    # ------------------------------------------------------------------ rebalance
    async def release(self, partitions: Iterable[int], *, checkpoint: bool = True) -> None:
        """A revoked partition: final checkpoint (unless ``checkpoint`` is False: exactly-once
        committed it already), then forget its keys (the new owner restores them)."""
        gone = sorted(set(partitions) & self.restored)
        if not gone:
            return
        async with self._lock:  # no checkpoint or restore between the last write and the drop
            if self.enabled and checkpoint:
                await self._checkpoint(gone)
            dropped = await self._on_engine(self._drop, gone)
            self.restored -= set(gone)
        log.info("released partitions %s (%d resident keys dropped)", gone, dropped)

    def _drop(self, partitions: list[int]) -> int:
        total = 0
        for p in partitions:
            total += self.engine.pool.drop_partition(p)
            self.store.drop_partition(p)
            self._retry.pop(p, None)
        return total
