"""Ragged micro-batches: N tokens of K keys advanced in one packed RNN call, with no padding.

Most keys have one token in a micro-batch, a few have several (or many: a ``tokens`` chunk): the
keys are ordered by their number of tokens (most first) and the tokens laid out time-major as a
packed sequence, so step 0 advances all K states straight from the pool and step t only the keys
with more than t tokens, all in one fused call. The per-token outputs come back as ``(N, H)`` rows, ready for the heads:
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
    :func:`step_ragged` (keys with several tokens first, most first, ties by first token;
    then the others by first token), and the layout.

    Whole-batch tensor ops only, however many tokens a key has (a chunk of 16 tokens of one
    key costs no more Python than one token). ``scratch``: an int64 tensor as long as the
    pool (its contents are overwritten).
    """
    n = len(slots)
    arange = _arange(n)
    scratch.index_fill_(0, slots, n)
    scratch.scatter_reduce_(0, slots, arange, reduce="amin")
    first_of = scratch.index_select(0, slots)  # each token's key's first token
    later = first_of != arange
    later_idx = later.nonzero().flatten()  # (L,) tokens that are not their key's first
    if not len(later_idx):
        return slots, Ragged()
    # A stable sort of the later tokens by their key's first token lines them up key by key
    # (the M keys with several tokens, numbered by first token), each key's in arrival order.
    later_first = first_of.index_select(0, later_idx)
    order = torch.sort(later_first, stable=True).indices
    first_s, idx_s = later_first.index_select(0, order), later_idx.index_select(0, order)
    run_start = torch.ones(len(order), dtype=torch.bool)
    torch.ne(first_s[1:], first_s[:-1], out=run_start[1:])
    starts = run_start.nonzero().flatten()  # (M,) where each key's run begins
    key_s = run_start.cumsum(0) - 1
    rank_s = _arange(len(order)) - starts.index_select(0, key_s) + 1  # 1, 2, ...: 0 is the first
    # batch order: most tokens first, a stable sort keeps first-token order among ties; then
    # the keys with one token, by first token
    multi_order = torch.sort(torch.bincount(key_s), descending=True, stable=True).indices
    multi_first = first_s.index_select(0, starts)
    single = ~later
    single.index_fill_(0, multi_first, False)
    firsts = torch.cat([multi_first.index_select(0, multi_order), single.nonzero().flatten()])
    row = torch.empty(len(multi_order), dtype=torch.long)
    row.index_copy_(0, multi_order, _arange(len(multi_order)))
    batch_sizes = torch.bincount(rank_s)  # keys taking step t: those with more than t tokens
    batch_sizes[0] = len(firsts)
    step_start = batch_sizes.cumsum(0) - batch_sizes
    packed = torch.empty(n, dtype=torch.long)
    packed[: len(firsts)] = firsts
    where = step_start.index_select(0, rank_s) + row.index_select(0, key_s)
    packed.index_copy_(0, where, idx_s)
    rank = torch.zeros(n, dtype=torch.long).index_copy_(0, idx_s, rank_s)
    return slots.index_select(0, firsts), Ragged(rank, packed, batch_sizes)


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
