"""The heads' fast top-k is torch.topk: same values, same indices, same order, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rnn.engine.topk import top_k


def _same(probs: torch.Tensor, k: int) -> None:
    values, ids = top_k(probs, k)
    ref = probs.topk(k, dim=-1)
    torch.testing.assert_close(values, ref.values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ids, ref.indices)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    width=st.integers(2, 700),
    k=st.integers(1, 8),
    scale=st.sampled_from([0.01, 1.0, 5.0, 40.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_top_k_equals_torch_topk(rows, width, k, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, width, generator=gen) * scale, -1)
    _same(probs, min(k, width))


@pytest.mark.parametrize("width", [256, 300, 1000])
def test_top_k_with_ties_zeros_and_nan_rows(width):
    gen = torch.Generator().manual_seed(width)
    probs = torch.softmax(torch.randn(512, width, generator=gen), -1)
    probs[0, :10] = probs[0].max()  # tie at the top
    probs[1, 7] = probs[1, 3] = probs[1].topk(5).values[-1]  # tie at the k-th place
    probs[2] = 0.0
    probs[2, 5] = 1.0  # one-hot: zeros decide the rest
    probs[3, 11] = float("nan")
    probs[4, 12] = -float("nan")  # sign bit set, as x86 makes it
    probs[5] = float("nan")
    probs[6, :] = 1.0 / width  # uniform
    probs[7, 100] = float("inf")
    probs[8, 9] = -0.0
    _same(probs, 5)
    _same(probs[:, : width - 3].contiguous(), 5)  # not a multiple of the group size
    _same(probs.t().contiguous().t(), 5)  # not contiguous


def test_top_k_small_batches_and_1d_are_plain_topk():
    probs = torch.softmax(torch.randn(3, 256), -1)
    _same(probs, 5)
    values, ids = top_k(probs[0], 5)
    ref = probs[0].topk(5)
    assert torch.equal(values, ref.values) and torch.equal(ids, ref.indices)
