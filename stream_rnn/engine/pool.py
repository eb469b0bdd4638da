"""The state pool: every active key's recurrent state as device tensors, indexed by slot.

``h`` (and ``c`` for LSTM) is one ``(num_layers, capacity, hidden)`` tensor, so a micro-batch
reads its keys' states with one ``index_select`` and writes them back with one indexed
assignment. A key→slot dict and an LRU order make admission, TTL expiry and capacity eviction
O(1) per key. Evicted states go to a :class:`~stream_rnn.engine.store.StateStore` and come
back bit for bit when their key returns (in float32 storage; float16/bfloat16 storage halves
memory at the price of rounding).

Eviction is not deletion: an evicted key lives on in the store. :meth:`StatePool.delete` (a
sequence's ``end``) and :meth:`StatePool.retire` (the retention TTL) forget a key everywhere and
record it, so that the checkpointer writes a tombstone for it (:meth:`StatePool.take_deleted`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from stream_rnn.engine.exceptions import PoolError
from stream_rnn.engine.ragged import long_tensor
from stream_rnn.engine.store import MemoryStateStore, StateStore, StoredState
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import State

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StatePool:
    """Bounded pool of per-key states with LRU eviction, TTL expiry and exact restore.

    Example::

        pool = StatePool(cfg, capacity=10_000, ttl_s=3600, retention_s=7 * 86400)
        slots = pool.lookup(["user-1", "user-2"])
        state = pool.gather(slots)          # (L, 2, H) float32
        pool.scatter(slots, new_state)
        pool.delete("user-2")               # its sequence ended
        pool.retire()                       # keys idle for a week are deleted too
        tombstones = pool.take_deleted(partition=0)

    ``ttl_s`` moves keys idle that long from memory to the store (they come back exactly);
    ``retention_s`` deletes keys idle that long, in memory and in the store. Idle time of
    resident keys is measured with ``clock`` (monotonic by default), that of stored keys in
    wall-clock time (``time.time()``), which the store keeps across restarts; a key leaving
    memory takes its wall-clock last use along (now minus its idle time by ``clock``).
    """

    def __init__(
        self,
        config: ModelConfig,
        capacity: int,
        *,
        device: str | torch.device = "cpu",
        storage: str = "float32",
        ttl_s: float | None = None,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        retention_s: float | None = None,
    ) -> None:
        if capacity < 1:
            raise PoolError(f"pool capacity must be >= 1 key, got {capacity}")
        if storage not in STORAGE_DTYPES:
            raise PoolError(
                f"state storage {storage!r} is unknown; use {', '.join(STORAGE_DTYPES)}"
            )
        if ttl_s is not None and ttl_s <= 0:
            raise PoolError(f"state TTL must be > 0 seconds (or None for no expiry), got {ttl_s}")
        if retention_s is not None and retention_s <= 0:
            raise PoolError(
                f"state retention must be > 0 seconds (or None to keep idle keys), got {retention_s}"
            )
        if retention_s is not None and ttl_s is not None and retention_s < ttl_s:
            raise PoolError(
                f"state retention {retention_s} s is shorter than the memory TTL {ttl_s} s: "
                "retention shorter than the memory TTL would delete keys before they could be "
                "evicted; set the retention >= the TTL (or no TTL)"
            )
        self.config = config
        self.capacity = capacity
        self.device = torch.device(device)
        self.dtype = STORAGE_DTYPES[storage]
        self.ttl_s = ttl_s
        self.retention_s = retention_s
        self.store: StateStore = store if store is not None else MemoryStateStore()
        self.clock = clock
        shape = (config.num_layers, capacity, config.hidden_size)
        self.h = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.c = torch.zeros_like(self.h) if config.is_lstm else None
        self.seq = torch.zeros(capacity, dtype=torch.long)
        self.pos = torch.zeros(capacity, dtype=torch.long)
        # exactly-once bookkeeping: last applied source offset, source partition, and whether
        # the state changed since the last checkpoint
        self.applied = torch.full((capacity,), -1, dtype=torch.long)
        self.part = torch.full((capacity,), -1, dtype=torch.long)
        self.dirty = torch.zeros(capacity, dtype=torch.bool)
        self.slot_of: dict[str, int] = {}
        self.key_at: list[str | None] = [None] * capacity
        # LRU order and idle time per slot as tensors: touching a batch of keys is one indexed
        # write instead of a Python call per key; victims are found with one topk when needed.
        self._tick = 0
        self.last_tick = torch.zeros(capacity, dtype=torch.long)
        self.last_time = torch.zeros(capacity, dtype=torch.float64)
        self.occupied = torch.zeros(capacity, dtype=torch.bool)
        self._free = list(range(capacity - 1, -1, -1))
        # deleted key -> (source partition, applied offset), until taken for tombstones
        self._deleted: dict[str, tuple[int, int]] = {}
        self.evictions = 0
        self.expirations = 0
        self.restores = 0
        self.deletions = 0
        self.retirements = 0

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self.slot_of

    def known(self, key: str) -> bool:
        """Whether the key has a state, in the pool or in the store."""
        return key in self.slot_of or key in self.store

    @property
    def nbytes(self) -> int:
        per = self.h.numel() * self.h.element_size()
        return per * (2 if self.c is not None else 1)

    # ------------------------------------------------------------------ slots
    def lookup(self, keys: Sequence[str]) -> Tensor:
        """Slots (CPU int64) for distinct ``keys``, admitting (restoring) absent ones.

        All ``keys`` are resident when this returns, so ``len(keys)`` must not exceed the
        capacity (the engine splits larger micro-batches).
        """
        if len(keys) > self.capacity:
            raise PoolError(
                f"{len(keys)} distinct keys in one step exceed the pool capacity {self.capacity}; "
                "raise the capacity or lower the micro-batch size"
            )
        self._tick += 1
        get = self.slot_of.get
        slots = [get(key, -1) for key in keys]
        if -1 in slots:
            missing = [i for i, slot in enumerate(slots) if slot < 0]
            hits = long_tensor([s for s in slots if s >= 0])
            # pin the keys already resident so making room never evicts one of them
            self.last_tick[hits] = self._tick
            shortfall = len(missing) - len(self._free)
            if shortfall > 0:
                self._evict_lru(shortfall)
            self._admit(keys, slots, missing)
        idx = long_tensor(slots)
        self.last_tick[idx] = self._tick
        self.last_time[idx] = self.clock()
        return idx

    def touch(self, slots: Tensor) -> None:
        """Mark resident ``slots`` used by a new step (LRU order, TTL), as :meth:`lookup` does."""
        self._tick += 1
        self.last_tick[slots] = self._tick
        self.last_time[slots] = self.clock()

    def _evict_lru(self, count: int) -> None:
        ticks = self.last_tick.masked_fill(~self.occupied, torch.iinfo(torch.long).max)
        victims = torch.topk(ticks, count, largest=False).indices.tolist()
        for slot in victims:
            key = self.key_at[slot]
            if key is None or int(self.last_tick[slot]) == self._tick:
                raise PoolError("internal: tried to evict a key pinned by the current step")
            self.evict(key)
            self.evictions += 1

    def _admit(self, keys: Sequence[str], slots: list[int], missing: list[int]) -> None:
        """Give ``keys[i]`` for i in ``missing`` a free slot (written into ``slots``): restored
        from the store, or a zero state; the per-slot resets are batched into indexed writes."""
        fresh: list[int] = []
        admitted: list[int] = []
        revived: list[tuple[int, tuple[int, int]]] = []
        try:
            for i in missing:
                key = keys[i]
                saved = self.store.pop(key)
                slot = self._free.pop()
                deleted_from = self._deleted.pop(key, None)
                if saved is None:
                    fresh.append(slot)
                    if deleted_from is not None and deleted_from[0] >= 0:
                        revived.append((slot, deleted_from))
                else:
                    self.h[:, slot] = saved.h.to(self.device, self.dtype)
                    if self.c is not None and saved.c is not None:
                        self.c[:, slot] = saved.c.to(self.device, self.dtype)
                    self.seq[slot] = saved.seq
                    self.pos[slot] = saved.pos
                    self.applied[slot] = saved.offset
                    self.part[slot] = saved.partition
                    self.restores += 1
                self.slot_of[key] = slot
                self.key_at[slot] = key
                slots[i] = slot
                admitted.append(slot)
        finally:  # a store error leaves the keys admitted so far consistent
            if fresh:
                idx = long_tensor(fresh)
                on_device = idx.to(self.device)
                self.h[:, on_device] = 0
                if self.c is not None:
                    self.c[:, on_device] = 0
                self.seq[idx] = 0
                self.pos[idx] = 0
                self.applied[idx] = -1
                self.part[idx] = -1
            if admitted:
                idx = long_tensor(admitted)
                self.dirty[idx] = False
                self.occupied[idx] = True
                self.last_tick[idx] = self._tick
            # A key deleted since the last checkpoint that starts again needs no tombstone: its
            # new state record supersedes the old one. So that it does even if no token reaches
            # it before the next checkpoint, the new state is dirty and takes the partition and
            # offset that deleted the old one (restores keep the highest offset; the key's
            # events up to that offset belong to the ended state and stay skipped).
            for slot, (partition, offset) in revived:
                self.part[slot] = partition
                self.applied[slot] = offset
                self.dirty[slot] = True

    def snapshot(self, key: str) -> StoredState:
        """A CPU copy of a resident key's state and counters."""
        slot = self.slot_of[key]
        return StoredState(
            h=self.h[:, slot].to("cpu", copy=True),
            c=self.c[:, slot].to("cpu", copy=True) if self.c is not None else None,
            seq=int(self.seq[slot]),
            pos=int(self.pos[slot]),
            offset=int(self.applied[slot]),
            partition=int(self.part[slot]),
        )

    def evict(self, key: str) -> None:
        """Move a resident key's state to the store and free its slot."""
        slot = self.slot_of[key]
        idle = max(0.0, self.clock() - float(self.last_time[slot]))
        self.store.put(key, self.snapshot(key), last_used=time.time() - idle)
        self._release(key, slot)

    def _release(self, key: str, slot: int) -> None:
        """Free a resident key's slot (its state is left wherever the caller put it)."""
        del self.slot_of[key]
        self.key_at[slot] = None
        self.occupied[slot] = False
        self.dirty[slot] = False
        self._free.append(slot)

    def expire(self, now: float | None = None) -> int:
        """Evict keys idle for longer than the TTL; returns how many."""
        if self.ttl_s is None:
            return 0
        limit = (self.clock() if now is None else now) - self.ttl_s
        stale = (self.occupied & (self.last_time <= limit)).nonzero().flatten().tolist()
        for slot in stale:
            key = self.key_at[slot]
            if key is not None:
                self.evict(key)
        self.expirations += len(stale)
        return len(stale)

    def take_dirty(self, partition: int | None = None) -> list[tuple[str, StoredState]]:
        """Snapshots of the states changed since the last call (of one source partition or all),
        marking them clean: what an incremental checkpoint writes."""
        mask = self.dirty & self.occupied
        if partition is not None:
            mask &= self.part == partition
        idx = mask.nonzero().flatten()
        if not len(idx):
            return []
        # one indexed copy for all of them (a snapshot per key costs ~10x more); the states
        # are views into that copy, independent of the pool's later writes
        on_device = idx.to(self.device)
        h = self.h.index_select(1, on_device).to("cpu")
        c = self.c.index_select(1, on_device).to("cpu") if self.c is not None else None
        seq, pos = self.seq[idx].tolist(), self.pos[idx].tolist()
        applied, part = self.applied[idx].tolist(), self.part[idx].tolist()
        out = []
        for i, slot in enumerate(idx.tolist()):
            key = self.key_at[slot]
            if key is not None:
                state = StoredState(
                    h=h[:, i],
                    c=c[:, i] if c is not None else None,
                    seq=seq[i],
                    pos=pos[i],
                    offset=applied[i],
                    partition=part[i],
                )
                out.append((key, state))
        self.dirty[idx] = False
        return out

    def discard(self, key: str) -> None:
        """Forget a resident key's state without storing it (a newer copy replaces it).

        Not a deletion: nothing is recorded for a tombstone (see :meth:`delete`).
        """
        self._release(key, self.slot_of[key])

    def drop_partition(self, partition: int) -> int:
        """Forget every resident key of a source partition and its pending deletions (after a
        final checkpoint, when the partition moves to another worker); returns how many
        resident keys were dropped."""
        slots = (self.occupied & (self.part == partition)).nonzero().flatten().tolist()
        for slot in slots:
            key = self.key_at[slot]
            if key is not None:
                self._release(key, slot)
        for key in [k for k, (p, _) in self._deleted.items() if p == partition]:
            del self._deleted[key]
        return len(slots)

    # ------------------------------------------------------------------ lifecycle
    def delete(self, key: str) -> bool:
        """Forget ``key``'s state everywhere: its slot (nothing stored) and its stored copy,
        pending checkpoint write included; whether the key had a state.

        The deletion is recorded for :meth:`take_deleted` (the checkpointer writes a tombstone),
        with the key's source partition. The key's next token starts a new state: zeros,
        ``pos`` 0, ``seq`` 0.
        """
        slot = self.slot_of.get(key)
        if slot is not None:
            where = (int(self.part[slot]), int(self.applied[slot]))
            self._release(key, slot)
            self.store.delete(key)  # an older copy may wait there for its checkpoint write
        else:
            saved = self.store.pop(key)  # the stored state names its partition and offset
            self.store.delete(key)  # and its pending checkpoint write, if any
            if saved is None:
                return False
            where = (saved.partition, saved.offset)
        self._deleted[key] = where
        self.deletions += 1
        return True

    def retire(self, now_wall: float | None = None, *, now: float | None = None) -> int:
        """Delete (as :meth:`delete`) every key idle for ``retention_s`` or longer, resident or
        stored; returns how many.

        Resident keys are judged by the pool's ``clock`` (``now`` overrides its reading: with
        an injected clock, in that clock's seconds), stored keys by wall-clock time
        (``now_wall``, default ``time.time()``).
        """
        if self.retention_s is None:
            return 0
        limit = (self.clock() if now is None else now) - self.retention_s
        stale = (self.occupied & (self.last_time <= limit)).nonzero().flatten().tolist()
        count = 0
        for slot in stale:
            key = self.key_at[slot]
            if key is not None and self.delete(key):
                count += 1
        wall = time.time() if now_wall is None else now_wall
        for key, partition, offset in self.store.delete_idle(wall - self.retention_s):
            # a resident key's stored row can only be an older copy: the key lives on
            if key not in self.slot_of:
                self._deleted[key] = (partition, offset)
                self.deletions += 1
                count += 1
        self.retirements += count
        return count

    @property
    def deleted(self) -> Mapping[str, tuple[int, int]]:
        """Keys deleted and not taken yet: key -> ``(source partition, applied offset)``
        (read-only view)."""
        return MappingProxyType(self._deleted)

    def take_deleted(self, partition: int | None = None) -> list[tuple[str, int, int]]:
        """``(key, source partition, applied offset)`` of the keys deleted since the last call
        (of one source partition or all), forgetting them: the tombstones a checkpoint writes.

        The offset is the last one applied to the deleted state: for ``end``, the offset of
        the ``end`` event. A key that never saw a source offset is reported with partition -1
        (it has no place on the state topic). A key that started again since its deletion is
        not reported (its new state record supersedes the old one).
        """
        if partition is None:
            out = [(k, p, o) for k, (p, o) in self._deleted.items()]
            self._deleted.clear()
            return out
        out = [(k, p, o) for k, (p, o) in self._deleted.items() if p == partition]
        for key, _, _ in out:
            del self._deleted[key]
        return out

    # ------------------------------------------------------------------ tensors
    def gather(self, slots: Tensor) -> State:
        """States of ``slots`` as float32 ``(L, B, H)`` (``(h, c)`` for LSTM), one indexed read."""
        idx = slots.to(self.device)
        h = self.h.index_select(1, idx).float()
        if self.c is None:
            return h
        return h, self.c.index_select(1, idx).float()

    def scatter(self, slots: Tensor, state: State) -> None:
        """Write states back to ``slots``, one indexed write."""
        idx = slots.to(self.device)
        if isinstance(state, tuple):
            if self.c is None:
                raise PoolError("an (h, c) LSTM state was written to a non-LSTM pool")
            self.h.index_copy_(1, idx, state[0].to(self.dtype))
            self.c.index_copy_(1, idx, state[1].to(self.dtype))
        else:
            self.h.index_copy_(1, idx, state.to(self.dtype))
        self.dirty[slots] = True

    def clear(self, slots: Tensor) -> None:
        """Start a new sequence for these keys: zero state, ``pos`` 0, ``seq`` + 1."""
        idx = slots.to(self.device)
        self.h[:, idx] = 0
        if self.c is not None:
            self.c[:, idx] = 0
        self.pos[slots] = 0
        self.seq[slots] += 1
        self.dirty[slots] = True
