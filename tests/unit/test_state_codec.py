"""State records: exact binary round trip, damaged records refused."""

from __future__ import annotations

import pytest
import torch

from stream_rnn.engine.exceptions import StateCodecError as StateError
from stream_rnn.engine.store import StoredState, decode_state, encode_state, encode_states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lstm", [False, True])
def test_round_trip_is_bit_exact(dtype: torch.dtype, lstm: bool) -> None:
    h = torch.randn(3, 17).to(dtype)
    c = torch.randn(3, 17).to(dtype) if lstm else None
    state = StoredState(h=h, c=c, seq=4, pos=9, offset=123456789012, partition=3)
    back = decode_state(encode_state(state))
    assert torch.equal(back.h, h) and back.h.dtype == dtype
    assert (back.c is None) == (c is None) and (c is None or torch.equal(back.c, c))
    assert (back.seq, back.pos, back.offset, back.partition) == (4, 9, 123456789012, 3)


def test_damaged_records_are_refused() -> None:
    good = encode_state(StoredState(h=torch.zeros(2, 4), c=None, seq=0, pos=1, offset=5))
    with pytest.raises(StateError, match="expected 32"):
        decode_state(good[:-3])
    with pytest.raises(StateError, match="damaged state record"):
        decode_state(b"not json\n")
    with pytest.raises(StateError, match="format 9"):
        decode_state(good.replace(b'"f":1', b'"f":9'))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lstm", [False, True])
def test_batch_encoding_is_byte_identical(dtype: torch.dtype, lstm: bool) -> None:
    # states as a checkpoint takes them: strided (L, H) views into one (L, N, H) copy
    h_all = torch.randn(2, 5, 7).to(dtype)
    c_all = torch.randn(2, 5, 7).to(dtype) if lstm else None
    states = [
        StoredState(
            h=h_all[:, i],
            c=c_all[:, i] if c_all is not None else None,
            seq=i,
            pos=10 * i,
            offset=1000 + i,
            partition=i % 3,
        )
        for i in range(5)
    ]
    assert encode_states(states) == [encode_state(s) for s in states]
    assert encode_states([]) == []


def test_batch_encoding_of_mixed_states_falls_back_per_state() -> None:
    states = [
        StoredState(h=torch.randn(2, 4), c=None, seq=0, pos=1, offset=5),
        StoredState(h=torch.randn(2, 4).half(), c=None, seq=1, pos=2, offset=6),
        StoredState(h=torch.randn(1, 3), c=torch.randn(1, 3), seq=2, pos=3, offset=7),
    ]
    assert encode_states(states) == [encode_state(s) for s in states]
