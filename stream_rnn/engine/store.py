"""Where states go when they leave the pool (TTL, capacity) and come back from, exactly.

The pool needs ``put`` / ``pop`` / ``contains`` for eviction and restore, and ``delete`` /
``delete_idle`` for the end of a key's life (``end``, retention); :class:`MemoryStateStore`
keeps evicted states in process memory. Durable stores implement the same protocol.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
import torch
from torch import Tensor

from stream_rnn.engine.exceptions import StateCodecError


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
    """Protocol of a store for evicted states.

    ``last_used`` is the wall-clock time (``time.time()`` seconds) the key was last used, for
    retention; ``None`` means now. ``delete`` and ``delete_idle`` forget keys for good (the
    caller records the deletions); ``pop`` hands a state back to the pool.
    """

    def put(self, key: str, state: StoredState, last_used: float | None = None) -> None: ...

    def pop(self, key: str) -> StoredState | None: ...

    def delete(self, key: str) -> bool: ...

    def delete_idle(self, before_wall: float) -> list[tuple[str, int, int]]: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...


class MemoryStateStore:
    """Evicted states kept in a dict (CPU tensors), with the wall-clock time of their last use.

    Example::

        pool = StatePool(cfg, capacity=1000, store=MemoryStateStore())
    """

    def __init__(self) -> None:
        self._data: dict[str, StoredState] = {}
        self._used: dict[str, float] = {}

    def put(self, key: str, state: StoredState, last_used: float | None = None) -> None:
        self._data[key] = state
        self._used[key] = time.time() if last_used is None else last_used

    def pop(self, key: str) -> StoredState | None:
        self._used.pop(key, None)
        return self._data.pop(key, None)

    def delete(self, key: str) -> bool:
        """Forget ``key``; whether the store held it."""
        self._used.pop(key, None)
        return self._data.pop(key, None) is not None

    def delete_idle(self, before_wall: float) -> list[tuple[str, int, int]]:
        """Forget every key last used at or before ``before_wall``; returns their ``(key,
        partition, offset)``. One pass over all stored keys (a store for tests and small
        deployments)."""
        idle = [key for key, used in self._used.items() if used <= before_wall]
        out = []
        for key in idle:
            del self._used[key]
            state = self._data.pop(key)
            out.append((key, state.partition, state.offset))
        return out

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


# ---------------------------------------------------------------- binary records
# A header JSON line then the raw tensor bytes: states are data, never pickled.
FORMAT = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def encode_state(state: StoredState) -> bytes:
    """Header JSON line + raw ``h`` (and ``c``) bytes, in the pool's storage dtype."""
    h = state.h.contiguous()
    header = {
        "f": FORMAT,
        "seq": state.seq,
        "pos": state.pos,
        "offset": state.offset,
        "partition": state.partition,
        "shape": list(h.shape),
        "dtype": _NAMES[h.dtype],
        "lstm": state.c is not None,
    }
    parts = [orjson.dumps(header), b"\n", h.view(torch.uint8).numpy().tobytes()]
    if state.c is not None:
        parts.append(state.c.contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def encode_states(states: Sequence[StoredState]) -> list[bytes]:
    """``[encode_state(s) for s in states]``, byte for byte, with one tensor copy for all.

    A checkpoint encodes every changed key at once; per key, the copy of a strided ``(L, H)``
    view and its conversion to bytes cost more than the rest of the record.
    """
    if not states:
        return []
    first = states[0]
    lstm = first.c is not None
    if any(
        s.h.shape != first.h.shape or s.h.dtype != first.h.dtype or (s.c is not None) != lstm
        for s in states
    ):
        return [encode_state(s) for s in states]
    tensors = [torch.stack([s.h for s in states])]
    if lstm:
        tensors.append(torch.stack([s.c for s in states if s.c is not None]))
    # (N, L, H) (twice for LSTM) -> N rows of raw bytes, h then c, as encode_state writes them
    raw = torch.cat([t.reshape(len(states), -1) for t in tensors], 1).view(torch.uint8).numpy()
    # The header's constant part, exactly as orjson writes it in encode_state; only the four
    # counters vary per key (bytes %-formatting is ~4x faster than a dict through orjson).
    tail = orjson.dumps(
        {"shape": list(first.h.shape), "dtype": _NAMES[first.h.dtype], "lstm": lstm}
    )
    template = b'{"f":%d,"seq":%d,"pos":%d,"offset":%d,"partition":%d,' + tail[1:] + b"\n"
    return [
        template % (FORMAT, s.seq, s.pos, s.offset, s.partition) + raw[i].tobytes()
        for i, s in enumerate(states)
    ]


def decode_position(value: bytes) -> tuple[int, int]:
    """``(offset, partition)`` of an encoded state, from its header alone (restores compare
    offsets of many records and keep the bytes of the newest as they are)."""
    try:
        header = orjson.loads(value.partition(b"\n")[0])
        if header.get("f") != FORMAT:
            raise StateCodecError(f"state record format {header.get('f')!r} is not {FORMAT}")
        return int(header["offset"]), int(header["partition"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateCodecError(f"damaged state record ({exc})") from exc


def decode_state(value: bytes) -> StoredState:
    """Inverse of :func:`encode_state`; raises :class:`StateError` on a damaged record."""
    try:
        head, _, body = value.partition(b"\n")
        header = orjson.loads(head)
        if header.get("f") != FORMAT:
            raise StateCodecError(f"state record format {header.get('f')!r} is not {FORMAT}")
        dtype = _DTYPES[header["dtype"]]
        shape = tuple(int(x) for x in header["shape"])
        # plain integers: two torch.tensor() calls here cost as much as the whole decode
        size = _ITEMSIZE[header["dtype"]] * math.prod(shape)
        want = size * (2 if header["lstm"] else 1)
        if len(body) != want:
            raise StateCodecError(f"state record body has {len(body)} bytes, expected {want}")
        raw = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        h = raw[:size].view(dtype).reshape(shape).clone()
        c = raw[size:].view(dtype).reshape(shape).clone() if header["lstm"] else None
        return StoredState(
            h=h,
            c=c,
            seq=int(header["seq"]),
            pos=int(header["pos"]),
            offset=int(header["offset"]),
            partition=int(header["partition"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateCodecError(f"damaged state record ({exc})") from exc
