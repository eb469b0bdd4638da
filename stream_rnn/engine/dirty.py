"""The states a checkpoint takes from the pool, copied at once and made per key when read.

`StatePool.take_dirty` runs while micro-batches wait (a checkpoint's states must match the
offsets it commits). Copying every changed state is a few whole-tensor operations; making a
`StoredState` per key is not (about 2 µs a key: ~25 ms for 10,000 keys, the largest stall of
an at-least-once worker's consume loop). `DirtyStates` holds the copies and makes the per-key
states when they are read, a slice at a time, which the checkpoint writer does in the
background (`stream_rnn.stream.state.send_state_records` reads 512 at a time).

Example::

    dirty = pool.take_dirty(partition=2)   # tensors copied, pool marked clean
    len(dirty), dirty.names[:3]
    for key, state in dirty[:512]:          # StoredState objects made here
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

from torch import Tensor

from stream_rnn.engine.store import StoredState

READ_SLICE = 512  # states made per step when iterated

Pair = tuple[str, StoredState]


class DirtyStates(Sequence[Pair]):
    """``(key, StoredState)`` pairs (keys in ``names``: a ``keys`` attribute would make ``dict()``
    take it for a mapping) over copied tensors ``h`` (and ``c``) of shape ``(L, N, H)``
    and per-key counters; a read makes the pairs it returns (views into the copies)."""

    __slots__ = ("names", "h", "c", "seq", "pos", "offsets", "partitions", "version", "hists")

    def __init__(
        self,
        names: list[str],
        h: Tensor,
        c: Tensor | None,
        seq: list[int],
        pos: list[int],
        offsets: list[int],
        partitions: list[int],
        version: str | None,
        hists: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.names, self.h, self.c = names, h, c
        self.seq, self.pos, self.offsets, self.partitions = seq, pos, offsets, partitions
        self.version = version
        self.hists = hists

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Pair: ...

    @overload
    def __getitem__(self, index: slice) -> list[Pair]: ...

    def __getitem__(self, index: int | slice) -> Pair | list[Pair]:
        span = range(len(self.names))[index]  # negative indices, bounds: as a list does
        if isinstance(span, int):
            return self._make(span, span + 1)[0]
        if span.step == 1:
            return self._make(span.start, span.stop)
        return [self._make(i, i + 1)[0] for i in span]

    def __iter__(self) -> Iterator[Pair]:
        for start in range(0, len(self.names), READ_SLICE):
            yield from self._make(start, min(start + READ_SLICE, len(self.names)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DirtyStates({len(self)} states, version {self.version!r})"

    def _make(self, start: int, stop: int) -> list[Pair]:
        if stop <= start:
            return []
        # views of a slice in one call each (indexing per key costs twice as much)
        hs = self.h[:, start:stop].unbind(1)
        n = stop - start
        cs: Sequence[Tensor | None] = (
            self.c[:, start:stop].unbind(1) if self.c is not None else [None] * n
        )
        hists: Sequence[Any] = self.hists[start:stop] if self.hists is not None else [None] * n
        names, version = self.names, self.version
        seq, pos, offsets, parts = self.seq, self.pos, self.offsets, self.partitions
        return [
            (
                names[start + j],
                StoredState(
                    hs[j],
                    cs[j],
                    seq[start + j],
                    pos[start + j],
                    offsets[start + j],
                    parts[start + j],
                    version,
                    hists[j],
                ),
            )
            for j in range(n)
        ]
