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
from typing import Any, Protocol

import orjson
import torch
from torch import Tensor

from stream_rnn.engine.exceptions import StateCodecError


@dataclass(frozen=True, slots=True)
class StoredState:
    """One key's state as it left the pool: tensors ``(L, H)`` (h, and c for LSTM) + counters.

    ``offset`` is the source offset of the last event applied to this state (-1 if unknown) and
    ``partition`` the source partition of the key: together they make restores exactly-once.
    ``version`` is the model version that produced the state (``None``: unknown, a record
    written before states named their version, or by a pool serving no named model);
    ``history`` the key's last token ids (int32, oldest first) when the pool keeps them for a
    rewarm after a model swap, ``None`` when it keeps none.
    """

    h: Tensor
    c: Tensor | None
    seq: int
    pos: int
    offset: int = -1
    partition: int = -1
    version: str | None = None
    history: Tensor | None = None

    @property
    def nbytes(self) -> int:
        size = self.h.numel() * self.h.element_size()
        if self.c is not None:
            size += self.c.numel() * self.c.element_size()
        if self.history is not None:
            size += self.history.numel() * self.history.element_size()
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
# Format 2 adds the model version ("v") and the token history ("hist": how many int32 ids
# follow h and c) to format 1. A state with neither is written as format 1, byte for byte what
# earlier releases write, so that they can still read it; both formats are read.
FORMAT = 2
_PLAIN_FORMAT = 1
_READABLE = (1, 2)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _format_of(state: StoredState) -> int:
    return _PLAIN_FORMAT if state.version is None and state.history is None else FORMAT


def _history_bytes(history: Tensor | None) -> bytes:
    if history is None:
        return b""
    return history.to(torch.int32).contiguous().numpy().tobytes()


def encode_state(state: StoredState) -> bytes:
    """Header JSON line + raw ``h`` (and ``c``) bytes, in the pool's storage dtype, then the
    token history (int32) if the state has one."""
    h = state.h.contiguous()
    header: dict[str, object] = {
        "f": _format_of(state),
        "seq": state.seq,
        "pos": state.pos,
        "offset": state.offset,
        "partition": state.partition,
    }
    if state.version is not None:
        header["v"] = state.version
    if state.history is not None:
        header["hist"] = len(state.history)
    header.update(shape=list(h.shape), dtype=_NAMES[h.dtype], lstm=state.c is not None)
    parts = [orjson.dumps(header), b"\n", h.view(torch.uint8).numpy().tobytes()]
    if state.c is not None:
        parts.append(state.c.contiguous().view(torch.uint8).numpy().tobytes())
    parts.append(_history_bytes(state.history))
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
    # The header's constant part, exactly as orjson writes it in encode_state; only the
    # counters, the version and the history length vary per key (bytes %-formatting is ~4x
    # faster than a dict through orjson).
    tail = orjson.dumps(
        {"shape": list(first.h.shape), "dtype": _NAMES[first.h.dtype], "lstm": lstm}
    )
    template = b'{"f":%d,"seq":%d,"pos":%d,"offset":%d,"partition":%d,%b%b' + tail[1:] + b"\n"
    versions: dict[str | None, bytes] = {None: b""}
    # every history's bytes from one concatenation, sliced per key (a conversion per key
    # costs as much as the rest of the record)
    histories = [s.history for s in states if s.history is not None]
    flat = _history_bytes(torch.cat(histories)) if histories else b""
    at = 0
    out = []
    for i, s in enumerate(states):
        version = versions.get(s.version)
        if version is None:
            version = versions[s.version] = b'"v":' + orjson.dumps(s.version) + b","
        if s.history is None:
            hist = tail_bytes = b""
        else:
            n = len(s.history)
            hist, tail_bytes = b'"hist":%d,' % n, flat[4 * at : 4 * (at + n)]
            at += n
        head = template % (_format_of(s), s.seq, s.pos, s.offset, s.partition, version, hist)
        out.append(head + raw[i].tobytes() + tail_bytes)
    return out


def _header(value: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, body = value.partition(b"\n")
    header = orjson.loads(head)
    if header.get("f") not in _READABLE:
        raise StateCodecError(
            f"state record format {header.get('f')!r} is not one of {list(_READABLE)}; was it "
            "written by a newer stream_rnn?"
        )
    return header, body


def decode_position(value: bytes) -> tuple[int, int]:
    """``(offset, partition)`` of an encoded state, from its header alone (restores compare
    offsets of many records and keep the bytes of the newest as they are)."""
    offset, partition, _ = decode_origin(value)
    return offset, partition


def decode_origin(value: bytes) -> tuple[int, int, str | None]:
    """``(offset, partition, model version)`` of an encoded state, from its header alone
    (version ``None``: the record names none)."""
    try:
        header = _header(value)[0]
        version = header.get("v")
        if version is not None and not isinstance(version, str):
            raise StateCodecError(f"state record version {version!r} is not a string")
        return int(header["offset"]), int(header["partition"]), version
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, StateCodecError):
            raise
        raise StateCodecError(f"damaged state record ({exc})") from exc


def decode_state(value: bytes) -> StoredState:
    """Inverse of :func:`encode_state`; raises :class:`StateCodecError` on a damaged record.

    A record without a version (format 1, or a pool serving no named model) decodes with
    ``version=None`` (unknown), one without a history with ``history=None``.
    """
    try:
        header, body = _header(value)
        dtype = _DTYPES[header["dtype"]]
        shape = tuple(int(x) for x in header["shape"])
        version = header.get("v")
        if version is not None and not isinstance(version, str):
            raise StateCodecError(f"state record version {version!r} is not a string")
        n_hist = header.get("hist")
        if n_hist is not None and (not isinstance(n_hist, int) or n_hist < 0):
            raise StateCodecError(f"state record history length {n_hist!r} is invalid")
        # plain integers: two torch.tensor() calls here cost as much as the whole decode
        size = _ITEMSIZE[header["dtype"]] * math.prod(shape)
        states = size * (2 if header["lstm"] else 1)
        want = states + 4 * (n_hist or 0)
        if len(body) != want:
            raise StateCodecError(f"state record body has {len(body)} bytes, expected {want}")
        raw = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        h = raw[:size].view(dtype).reshape(shape).clone()
        c = raw[size:states].view(dtype).reshape(shape).clone() if header["lstm"] else None
        history = raw[states:].view(torch.int32).clone() if n_hist is not None else None
        return StoredState(
            h=h,
            c=c,
            seq=int(header["seq"]),
            pos=int(header["pos"]),
            offset=int(header["offset"]),
            partition=int(header["partition"]),
            version=version,
            history=history,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, StateCodecError):
            raise
        raise StateCodecError(f"damaged state record ({exc})") from exc
