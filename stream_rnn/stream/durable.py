"""Crash-proof state for a worker: restore on assignment, incremental checkpoints, late acks.

How the exactly-once effect on state is kept (the Kafka Streams recipe, without faust's
``exactly_once`` mode):

* every state carries the source offset of the last event applied to it; the engine skips
  events at or below it, so redeliveries after a crash or rebalance never apply twice;
* every ``checkpoint_interval_s`` seconds (or ``checkpoint_every`` tokens) the states changed
  since the last checkpoint — resident ones and ones evicted meanwhile — are written to the
  compacted state topic (co-partitioned with the tokens topic) and acknowledged by the broker
  (acks=all); only then are the micro-batches they include acked, so consumer offsets never
  pass what is durable;
* a worker that gets a partition restores its keys from that partition of the state topic
  before it processes any of the partition's events; a revoked partition gets a last
  checkpoint and leaves the pool.

Predictions are at-least-once: tokens processed after the last checkpoint are processed again
after a crash and their predictions sent again, with the same ``partition:offset`` id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, TypeVar

from stream_rnn.engine.diskstore import DiskStateStore
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.store import StoredState
from stream_rnn.stream.adapter import CountingSensor
from stream_rnn.stream.state import StateWriter, restore_partition

log = logging.getLogger("stream_rnn.worker")
T = TypeVar("T")


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
        sensor: CountingSensor,
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
                states = await restore_partition(self.bootstrap, self.state_topic, partition)
                loaded = await self._on_engine(self._load, states)
                self.restored.add(partition)
                seconds = time.monotonic() - started
                self.sensor.restored_keys += loaded
                self.sensor.restore_seconds += seconds
                log.info(
                    "restored %d key states of partition %d in %.2fs", loaded, partition, seconds
                )

    def _load(self, states: dict[str, StoredState]) -> int:
        pool, count = self.engine.pool, 0
        for key, state in states.items():
            if key in pool:
                continue  # resident means newer: it was applied after this checkpoint
            self.store.put_restored(key, state)
            count += 1
        return count

    # ------------------------------------------------------------------ checkpoints
    def add_tokens(self, n: int) -> None:
        self._tokens += n

    def due(self) -> bool:
        if not self.enabled:
            return False
        return time.monotonic() - self._last >= self.interval_s or self._tokens >= self.every_tokens

    async def checkpoint(self, partitions: Iterable[int] | None = None) -> int:
        """Write every changed state (of ``partitions``, or all) durably; returns how many."""
        async with self._lock:
            started = time.monotonic()
            wanted = set(partitions) if partitions is not None else None
            by_part = await self._on_engine(self._collect, wanted)
            written = 0
            before = self.writer.bytes
            for partition, states in sorted(by_part.items()):
                written += await self.writer.write(partition, states)
            self._last = time.monotonic()
            self._tokens = 0
            s = self.sensor
            s.checkpoints += 1
            s.checkpoint_records += written
            s.checkpoint_bytes += self.writer.bytes - before
            s.checkpoint_seconds += self._last - started
            return written

    def _collect(self, wanted: set[int] | None) -> dict[int, list[tuple[str, StoredState]]]:
        out: dict[int, list[tuple[str, StoredState]]] = defaultdict(list)
        items = (
            self.engine.pool.take_dirty()
            if wanted is None
            else [kv for p in wanted for kv in self.engine.pool.take_dirty(partition=p)]
        )
        items += (
            self.store.take_pending()
            if wanted is None
            else [kv for p in wanted for kv in self.store.take_pending(partition=p)]
        )
        # One record per key, the newest: a key evicted (pending) and re-admitted since the last
        # checkpoint is in both lists, and compaction keeps whichever is written last.
        newest: dict[str, StoredState] = {}
        for key, state in items:
            old = newest.get(key)
            if old is None or state.offset >= old.offset:
                newest[key] = state
        for key, state in newest.items():
            if state.partition >= 0:  # -1: never saw an offset (exactly-once off)
                out[state.partition].append((key, state))
        return out

    # ------------------------------------------------------------------ rebalance
    async def release(self, partitions: Iterable[int]) -> None:
        """A revoked partition: final checkpoint, then forget its keys (the new owner restores)."""
        gone = sorted(set(partitions) & self.restored)
        if not gone:
            return
        if self.enabled:
            await self.checkpoint(gone)
        dropped = await self._on_engine(self._drop, gone)
        self.restored -= set(gone)
        log.info("released partitions %s (%d resident keys dropped)", gone, dropped)

    def _drop(self, partitions: list[int]) -> int:
        total = 0
        for p in partitions:
            total += self.engine.pool.drop_partition(p)
            self.store.drop_partition(p)
        return total
