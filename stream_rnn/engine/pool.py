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

States belong to a model version. An engine binds its pool to its model (:meth:`StatePool.bind`)
and every resident state is of that version; :meth:`StatePool.swap` brings them all to a new
one. Stored states keep the version they left with and follow the recorded swaps (or, for a
version no recorded swap leads from, the deployment's ``swap_policy``) when they are admitted
again: lazily, so that a swap costs the resident keys only, however many keys the store holds,
and the converted state is dirty (written by the next checkpoint) from its admission on.
With ``history=N`` the pool keeps every key's last N tokens (:mod:`~stream_rnn.engine.history`)
next to its state, wherever the state goes, for a ``rewarm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import cast

import torch
from torch import Tensor

from stream_rnn.engine.dirty import DirtyStates
from stream_rnn.engine.exceptions import PoolError
from stream_rnn.engine.history import TokenHistory
from stream_rnn.engine.ragged import long_tensor
from stream_rnn.engine.store import MemoryStateStore, StateStore, StoredState
from stream_rnn.engine.swap import restate
from stream_rnn.engine.versions import Plan, SwapPolicy, VersionBook, check_policy, vocab_map
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel, State
from stream_rnn.train.vocab import Vocab

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what a stored state becomes in a pool bound to no model version: as it is if it fits
_AS_IS = Plan("keep", retag=False, reason="the pool serves no named version")
_UNFIT = Plan("reset", reason="its shape does not fit the pool: reset")


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

    ``history`` (tokens per key, 0: none) keeps each key's last tokens for a ``rewarm`` after a
    model swap; ``swap_policy`` (``keep``, ``reset`` or ``rewarm``; default ``rewarm`` with a
    history, else ``reset``) is what a restored state of a version no recorded swap leads from
    gets; ``adopt_unversioned`` takes states without a version (written before states recorded
    theirs) as the current version's instead of giving them ``swap_policy``.
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
        history: int = 0,
        swap_policy: SwapPolicy | None = None,
        adopt_unversioned: bool = True,
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
        if history < 0:
            raise PoolError(f"token history must be >= 0 tokens per key (0: off), got {history}")
        self.swap_policy = check_policy(swap_policy or ("rewarm" if history else "reset"))
        if self.swap_policy == "rewarm" and not history:
            raise PoolError(
                "swap policy 'rewarm' recomputes states from each key's last tokens: give the "
                "pool a token history (history=N, e.g. 32) or choose 'reset' or 'keep'"
            )
        self.adopt_unversioned = adopt_unversioned
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
        self.history = TokenHistory(capacity, history) if history else None
        # the model versions served; None until an engine binds the pool to its model
        self.book: VersionBook | None = None
        # stored states admitted with another version, by the policy they got
        self.conversions = {"keep": 0, "reset": 0, "rewarm": 0}
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
        tokens = self.history.ids.numel() * 4 if self.history is not None else 0
        return per * (2 if self.c is not None else 1) + tokens

    # ------------------------------------------------------------------ versions
    @property
    def version(self) -> str | None:
        """The model version of every resident state (None: the pool serves no named model)."""
        return self.book.version if self.book is not None else None

    def bind(self, version: str, model: RecurrentModel, vocab: Vocab) -> None:
        """Serve ``model`` (of ``version``): what an engine does with its pool. Binding again
        to the same version replaces the model object; another version needs :meth:`swap`."""
        cfg = model.config
        if (cfg.num_layers, cfg.hidden_size, cfg.is_lstm) != (
            self.h.shape[0],
            self.h.shape[2],
            self.c is not None,
        ):
            raise PoolError(
                f"the pool holds {self.h.shape[0]} x {self.h.shape[2]} "
                f"{'LSTM ' if self.c is not None else ''}states, model {version} needs "
                f"{cfg.num_layers} x {cfg.hidden_size} ({cfg.cell}); build the pool from the "
                "model's config"
            )
        if self.book is None:
            self.book = VersionBook(
                version,
                model,
                vocab,
                policy=self.swap_policy,
                history=self.history is not None,
                adopt_unversioned=self.adopt_unversioned,
            )
        elif self.book.version != version:
            raise PoolError(
                f"the pool serves model version {self.book.version}, not {version}; change "
                "models with Engine.swap"
            )
        else:
            self.book.model = model
        self.config = cfg

    def swap(self, model: RecurrentModel, version: str, vocab: Vocab, policy: SwapPolicy) -> int:
        """Bring every resident state to ``model`` (of ``version``) under ``policy`` and mark
        it dirty; stored states follow when admitted. Returns how many states were resident.

        The caller checks that ``keep`` is allowed (same architecture and vocabulary). The
        state tensors are reallocated when the architecture changes (the old ones are freed
        first: neither reset nor rewarm reads them).
        """
        book = self.book
        if book is None:
            raise PoolError("swap() on a pool bound to no model; an Engine binds its pool")
        slots = self.occupied.nonzero().flatten()
        cfg = model.config
        if policy != "keep":
            shape = (cfg.num_layers, self.capacity, cfg.hidden_size)
            if tuple(self.h.shape) != shape or cfg.is_lstm != (self.c is not None):
                self.h = self.c = None  # type: ignore[assignment]
                # normal tensors even if the caller runs in inference mode: the pool's tensors
                # are written in place outside it too (restores, tests)
                with torch.inference_mode(False):
                    self.h = torch.zeros(shape, device=self.device, dtype=self.dtype)
                    self.c = torch.zeros_like(self.h) if cfg.is_lstm else None
            if policy == "reset" or self.history is None:
                self.h.zero_()
                if self.c is not None:
                    self.c.zero_()
                if self.history is not None:
                    self.history.count.zero_()
            else:
                plan = Plan(
                    "rewarm",
                    model=model,
                    id_map=vocab_map(book.vocab, vocab),
                    vocab_size=len(vocab),
                )
                restate(self, slots, plan)
        book.advance(version, model, vocab, policy)
        self.config = cfg
        self.dirty[slots] = True
        return len(slots)

    def _fits(self, saved: StoredState) -> bool:
        h, c = saved.h, saved.c
        return (
            h.dim() == 2
            and (h.shape[0], h.shape[1]) == (self.h.shape[0], self.h.shape[2])
            and (c is None) == (self.c is None)
            and (c is None or c.shape == h.shape)
        )

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
        # stored states of another version (or shape), by the plan that brings them up to date
        converting: dict[int, tuple[Plan, list[int]]] = {}
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
                    fits = self._fits(saved)
                    if self.book is not None:
                        plan = self.book.plan(saved.version, fits)
                    else:
                        plan = _AS_IS if fits else _UNFIT
                    if plan.policy == "keep":
                        self.h[:, slot] = saved.h.to(self.device, self.dtype)
                        if self.c is not None and saved.c is not None:
                            self.c[:, slot] = saved.c.to(self.device, self.dtype)
                    if plan.retag or plan.policy != "keep":
                        converting.setdefault(id(plan), (plan, []))[1].append(slot)
                    if self.history is not None:
                        self.history.load(slot, saved.history)  # restate maps or clears it
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
                if self.history is not None:
                    self.history.clear(idx)
            if admitted:
                idx = long_tensor(admitted)
                self.dirty[idx] = False
                self.occupied[idx] = True
                self.last_tick[idx] = self._tick
            # A state of another version is brought up to date before anything reads it, and
            # is dirty: its record must name the version it now has.
            for plan, group in converting.values():
                idx = long_tensor(group)
                restate(self, idx, plan)
                self.dirty[idx] = True
                self.conversions[plan.policy] += len(group)
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
        history = None
        if self.history is not None:
            ids, lengths = self.history.rows(long_tensor([slot]))
            history = ids[0, : int(lengths[0])].to(torch.int32)
        return StoredState(
            h=self.h[:, slot].to("cpu", copy=True),
            c=self.c[:, slot].to("cpu", copy=True) if self.c is not None else None,
            seq=int(self.seq[slot]),
            pos=int(self.pos[slot]),
            offset=int(self.applied[slot]),
            partition=int(self.part[slot]),
            version=self.version,
            history=history,
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

    def take_dirty(self, partition: int | None = None) -> DirtyStates:
        """Snapshots of the states changed since the last call (of one source partition or all),
        marking them clean: what an incremental checkpoint writes. The tensors are copied now
        (independent of the pool's later writes); the per-key states are made when read (see
        stream_rnn/engine/dirty.py)."""
        mask = self.dirty & self.occupied
        if partition is not None:
            mask &= self.part == partition
        idx = mask.nonzero().flatten()
        key_at = self.key_at
        keys = [key_at[slot] for slot in idx.tolist()]
        if None in keys:  # an occupied slot always has its key; never taken, never written
            idx = idx[long_tensor([i for i, k in enumerate(keys) if k is not None])]
            keys = [k for k in keys if k is not None]
        self.dirty[idx] = False
        # one indexed copy for all of them (a snapshot per key costs ~10x more)
        on_device = idx.to(self.device)
        h = self.h.index_select(1, on_device).to("cpu")
        c = self.c.index_select(1, on_device).to("cpu") if self.c is not None else None
        hists: Sequence[Tensor | None] | None = None
        if self.history is not None and len(idx):
            ids, lengths = self.history.rows(idx)
            # one split of the valid ids into per-key views (slicing per key costs ~5x more)
            valid = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
            hists = ids.to(torch.int32)[valid].split(lengths.tolist())
        return DirtyStates(
            cast(list[str], keys),
            h,
            c,
            self.seq[idx].tolist(),
            self.pos[idx].tolist(),
            self.applied[idx].tolist(),
            self.part[idx].tolist(),
            self.version,
            hists,
        )

    def dirty_partitions(self) -> list[int]:
        """The source partitions that have changed states (-1: states with no offset yet)."""
        return sorted(self.part[self.dirty & self.occupied].unique().tolist())

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
        if self.history is not None:  # a rewarm replays the current sequence only
            self.history.clear(slots)
        self.dirty[slots] = True
