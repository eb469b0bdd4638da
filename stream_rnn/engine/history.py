"""Each resident key's last tokens, kept so that a new model can rewarm its state.

One ``(capacity, size)`` int32 ring per pool: a slot's ``count`` says how many tokens it has
seen since its history was last cleared, token ``n`` sits in column ``n % size``. Appending a
micro-batch is a handful of tensor ops whatever the number of keys (no per-token Python);
reading rows back puts them in order, oldest first, left-aligned, as a packed pass wants them.
The ring lives on the CPU whatever the pool's device: it is written from the token ids the
engine builds on the CPU anyway and only read when a key leaves the pool or a model changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stream_rnn.engine.exceptions import PoolError


class TokenHistory:
    """The last ``size`` token ids of every pool slot.

    Example::

        hist = TokenHistory(capacity=4, size=3)
        hist.append(torch.tensor([0, 1]), torch.tensor([7, 8]), rank=None)
        ids, lengths = hist.rows(torch.tensor([0, 1]))   # [[7, 0, 0], [8, 0, 0]], [1, 1]
    """

    def __init__(self, capacity: int, size: int) -> None:
        if size < 1:
            raise PoolError(f"token history must keep >= 1 token per key (or be off), got {size}")
        self.size = size
        self.ids = torch.zeros((capacity, size), dtype=torch.int32)
        self.count = torch.zeros(capacity, dtype=torch.long)
        self._cols = torch.arange(size)

    def append(self, at: Tensor, tokens: Tensor, rank: Tensor | None) -> None:
        """Append ``tokens`` (N,) to their keys' slots ``at`` (N,); ``rank`` (N,): each token's
        place among its key's tokens of this batch (``None``: every key has one token)."""
        before = self.count.index_select(0, at)
        if rank is None:
            place = before
            self.count.index_copy_(0, at, before + 1)
        else:
            place = before + rank
            self.count.index_add_(0, at, torch.ones_like(at))
            if int(rank.max()) >= self.size:
                # more tokens for a key than its ring holds: only its last `size` land, so that
                # no two tokens of one batch write the same cell (which would win is undefined)
                keep = place >= self.count.index_select(0, at) - self.size
                at, place, tokens = at[keep], place[keep], tokens[keep]
        flat = at * self.size + place.remainder(self.size)
        self.ids.view(-1).index_copy_(0, flat, tokens.to(torch.int32))

    def clear(self, slots: Tensor) -> None:
        """Forget the slots' tokens (a new sequence, a reset state, a fresh key)."""
        self.count[slots] = 0

    def lengths(self, slots: Tensor) -> Tensor:
        return self.count.index_select(0, slots).clamp(max=self.size)

    def rows(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """The slots' histories, oldest first: ids ``(K, size)`` int64 left-aligned (zeros
        after each row's length) and lengths ``(K,)``; a copy, independent of the ring."""
        count = self.count.index_select(0, slots)
        lengths = count.clamp(max=self.size)
        cols = (count - lengths).unsqueeze(1) + self._cols
        ids = self.ids.index_select(0, slots).gather(1, cols.remainder(self.size)).long()
        ids.masked_fill_(self._cols >= lengths.unsqueeze(1), 0)
        return ids, lengths

    def set_rows(self, slots: Tensor, ids: Tensor, lengths: Tensor) -> None:
        """Replace the slots' histories by left-aligned ``ids`` (K, <= size) of ``lengths``."""
        width = ids.shape[1]
        if width > self.size:
            raise PoolError(f"history rows of {width} tokens exceed the ring's {self.size}")
        block = torch.zeros((len(slots), self.size), dtype=torch.int32)
        block[:, :width] = ids
        self.ids.index_copy_(0, slots, block)
        self.count.index_copy_(0, slots, lengths.to(torch.long))

    def load(self, slot: int, ids: Tensor | None) -> None:
        """Give one slot a stored history (oldest first; only its last ``size`` are kept)."""
        if ids is None or not len(ids):
            self.count[slot] = 0
            return
        tail = ids[-self.size :]
        self.ids[slot, : len(tail)] = tail.to(torch.int32)
        self.count[slot] = len(tail)
