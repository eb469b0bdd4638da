"""Bringing pool states to a new model version: keep, reset or rewarm them, in batches.

:func:`restate` applies a :class:`~stream_rnn.engine.versions.Plan` to some of a pool's slots
(the resident keys at a swap, or keys admitted from the store with an older version);
:func:`rewarm_states` is the rewarm's one packed pass per chunk of keys, from zeros over each
key's retained tokens, so that a rewarmed state equals the new model's full forward pass over
those tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from stream_rnn.engine.versions import Plan, map_ids
from stream_rnn.model.network import RecurrentModel, State

if TYPE_CHECKING:
    from stream_rnn.engine.pool import StatePool

# keys per rewarm pass: (chunk, history) token ids and their embeddings at once
REWARM_CHUNK = 4096


def rewarm_states(model: RecurrentModel, ids: Tensor, lengths: Tensor) -> State:
    """States after ``lengths[k]`` tokens ``ids[k]`` (left-aligned, (K, T)) from zeros, in one
    packed pass of the model's streaming network; rows of length 0 get the zero state."""
    emb_layer, rnn = model.stream_modules()
    device = emb_layer.weight.device
    state = model.init_state(len(ids), device)
    some = (lengths > 0).nonzero().flatten()
    if not len(some):
        return state
    width = int(lengths.max())
    with torch.no_grad():
        emb = emb_layer(ids.index_select(0, some)[:, :width].to(device))
        packed = pack_padded_sequence(
            emb, lengths.index_select(0, some), batch_first=True, enforce_sorted=False
        )
        _, new = rnn(packed, None)  # h_n per row after its own last token, in input order
    rows = some.to(device)
    if isinstance(state, tuple) and isinstance(new, tuple):
        state[0].index_copy_(1, rows, new[0])
        state[1].index_copy_(1, rows, new[1])
    elif isinstance(state, Tensor) and isinstance(new, Tensor):
        state.index_copy_(1, rows, new)
    return state


def restate(pool: StatePool, slots: Tensor, plan: Plan) -> None:
    """Make the states at ``slots`` (CPU int64) what ``plan`` says (``keep``: as they are).

    ``reset``: zeros and an empty history. ``rewarm``: each slot's history mapped into the
    plan's vocabulary, then the plan's model over it from zeros; the mapped history stays.
    """
    if not len(slots) or plan.policy == "keep":
        return
    if plan.policy == "reset" or pool.history is None or plan.model is None:
        on_device = slots.to(pool.device)
        pool.h[:, on_device] = 0
        if pool.c is not None:
            pool.c[:, on_device] = 0
        if pool.history is not None:
            pool.history.clear(slots)
        return
    for chunk in slots.split(REWARM_CHUNK):
        ids, lengths = pool.history.rows(chunk)
        ids = map_ids(ids, plan.id_map, plan.vocab_size)
        ids.masked_fill_(torch.arange(ids.shape[1]) >= lengths.unsqueeze(1), 0)
        state = rewarm_states(plan.model, ids, lengths)
        on_device = chunk.to(pool.device)
        if isinstance(state, tuple):
            pool.h.index_copy_(1, on_device, state[0].to(pool.dtype))
            if pool.c is not None:
                pool.c.index_copy_(1, on_device, state[1].to(pool.dtype))
        else:
            pool.h.index_copy_(1, on_device, state.to(pool.dtype))
        pool.history.set_rows(chunk, ids, lengths)
