"""Where states go when they leave the pool (TTL, capacity) and come back from, exactly.

The pool only needs ``put`` / ``pop`` / ``contains``; :class:`MemoryStateStore` keeps evicted
states in process memory. Durable stores (a compacted Kafka topic) implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True, slots=True)
class StoredState:
    """One key's state as it left the pool: tensors ``(L, H)`` (h, and c for LSTM) + counters.

    ``offset`` is the source offset of the last event applied to this state (-1 if unknown) and
    ``partition`` the source partition of the key: together they make restores exactly-once.
    """

    h: Tensor
    c: Tensor | None
    seq: int
    pos: int
    offset: int = -1
    partition: int = -1

    @property
    def nbytes(self) -> int:
        size = self.h.numel() * self.h.element_size()
        if self.c is not None:
            size += self.c.numel() * self.c.element_size()
        return size


class StateStore(Protocol):
    """Protocol of a store for evicted states."""

    def put(self, key: str, state: StoredState) -> None: ...

    def pop(self, key: str) -> StoredState | None: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...


class MemoryStateStore:
    """Evicted states kept in a dict (CPU tensors).

    Example::

        pool = StatePool(cfg, capacity=1000, store=MemoryStateStore())
    """

    def __init__(self) -> None:
        self._data: dict[str, StoredState] = {}

    def put(self, key: str, state: StoredState) -> None:
        self._data[key] = state

    def pop(self, key: str) -> StoredState | None:
        return self._data.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
