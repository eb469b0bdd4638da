"""Ragged micro-batches: N tokens of K keys advanced in one packed RNN call, with no padding.

Most keys have one token in a micro-batch, a few have several: the keys are ordered by their
number of tokens (most first) and the tokens laid out time-major as a packed sequence, so step 0
advances all K states straight from the pool and step t only the keys with more than t tokens,
all in one fused call. The per-token outputs come back as ``(N, H)`` rows, ready for the heads:
no padded ``(K, T, H)`` grid, no sort by length of the whole batch, no copy of the whole state.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from stream_rnn.model.network import RecurrentModel, State


def long_tensor(values: list[int]) -> Tensor:
    """A CPU int64 tensor from a list of ints (several times faster than ``torch.tensor``)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)


@functools.lru_cache(maxsize=16)
def _arange(n: int) -> Tensor:
    return torch.arange(n)


@dataclass(slots=True)
class Ragged:
    """How N tokens fall on K keys when some key has several (all ``None`` when none has).

    ``rank`` (N,): each token's place among its key's tokens in this micro-batch; ``packed``
    (N,): the token at each place of the time-major packed sequence (step 0: every key's first
    token, keys with the most tokens first; step t: the (t+1)-th token of the keys that have
    one); ``batch_sizes``: how many keys take each step.
    """

    rank: Tensor | None = None
    packed: Tensor | None = None
    batch_sizes: Tensor | None = None


def group_slots(slots: Tensor, scratch: Tensor) -> tuple[Tensor, Ragged]:
    """Group tokens by their keys' pool slots (N,): the distinct slots in the batch order of
    :func:`step_ragged` (keys with several tokens first, then by first token), and the layout.

    Tensor ops but for a short Python pass over the few tokens that are not their key's first.
    ``scratch``: an int64 tensor as long as the pool (its contents are overwritten).
    """
    n = len(slots)
    arange = _arange(n)
    scratch.index_fill_(0, slots, n)
    scratch.scatter_reduce_(0, slots, arange, reduce="amin")
    first_of = scratch.index_select(0, slots)  # each token's key's first token
    later = first_of != arange
    later_idx = later.nonzero().flatten()
    if not len(later_idx):
        return slots, Ragged()
    extra: dict[int, list[int]] = {}  # a key's first token -> its other tokens, in order
    for i, first in zip(
        later_idx.tolist(), first_of.index_select(0, later_idx).tolist(), strict=True
    ):
        extra.setdefault(first, []).append(i)
    multi = sorted(extra, key=lambda f: -len(extra[f]))  # stable: ties keep arrival order
    ranks: list[int] = []
    steps: list[int] = []
    batch_sizes = [n - len(later_idx)]
    for t in range(len(extra[multi[0]])):
        running = [f for f in multi if len(extra[f]) > t]  # a prefix of multi
        steps += [extra[f][t] for f in running]
        ranks += [t + 1] * len(running)
        batch_sizes.append(len(running))
    multi_t = long_tensor(multi)
    single = ~later
    single.index_fill_(0, multi_t, False)
    firsts = torch.cat([multi_t, single.nonzero().flatten()])  # each key's first token
    steps_t = long_tensor(steps)
    rank = torch.zeros(n, dtype=torch.long)
    rank[steps_t] = long_tensor(ranks)
    packed = torch.cat([firsts, steps_t])
    return slots.index_select(0, firsts), Ragged(rank, packed, long_tensor(batch_sizes))


def step_ragged(
    model: RecurrentModel, tokens: Tensor, state: State, ragged: Ragged
) -> tuple[Tensor, State]:
    """Advance K keys' ``state`` (in the order :func:`group_slots` gives) by N ``tokens`` (N,)
    laid out by ``ragged``: the top-layer outputs (N, H) — in arrival order when no key has
    several tokens, else in ``ragged.packed`` order (row i is token ``packed[i]``'s) — and the
    new states. Same numbers as :meth:`RecurrentModel.step`.
    """
    emb_layer, rnn = model.stream_modules()
    if ragged.packed is None or ragged.batch_sizes is None:
        out, state = rnn(emb_layer(tokens).unsqueeze(1), state)
        return out[:, 0], state
    data = emb_layer(tokens.index_select(0, ragged.packed.to(tokens.device)))
    out, state = rnn(PackedSequence(data, ragged.batch_sizes), state)
    return out.data, state
