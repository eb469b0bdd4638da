"""Predictions back into score lines: sequences told apart by source order, not by ``seq``."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stream_rnn.engine.assemble import assemble
from stream_rnn.engine.exceptions import EngineError
from stream_rnn.stream.collect import to_lines


def _next(key: str, ident: str, pos: int, token: str, seq: int = 0) -> dict[str, Any]:
    return {
        "key": key,
        "id": ident,
        "type": "next",
        "seq": seq,
        "pos": pos,
        "model_version": "m",
        "next": {"tokens": [token], "probs": [1.0]},
    }


def _control(key: str, ident: str, typ: str, seq: int = 0, **payload: Any) -> dict[str, Any]:
    return {"key": key, "id": ident, "type": typ, "seq": seq, "pos": None, "model_version": "m"} | (
        payload
    )


def _tokens(lines: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
    return {ks: [s["tokens"][0] for s in line["next"]] for ks, line in lines.items()}


def test_two_sequences_of_a_key_both_seq_0_are_told_apart_by_offset() -> None:
    # end deletes the key, so its second sequence is seq 0 again
    preds = [
        _next("k", "0:1", 0, "a"),
        _next("k", "0:2", 1, "b"),
        _control("k", "0:3", "end", n_tokens=2),
        _next("k", "0:9", 0, "c"),
        _next("k", "0:10", 1, "d"),  # numerically after 0:9, not as a string
        _next("j", "0:4", 0, "x"),
    ]
    random.Random(3).shuffle(preds)
    assert _tokens(assemble(preds, "next-token")) == {
        ("k", 0): ["a", "b"],
        ("k", 1): ["c", "d"],
        ("j", 0): ["x"],
    }


def test_duplicates_are_dropped_before_splitting() -> None:
    preds = [
        _next("k", "0:1", 0, "a"),
        _control("k", "0:2", "end", n_tokens=1),
        _next("k", "0:1", 0, "a"),  # redelivered copies (at-least-once)
        _control("k", "0:2", "end", n_tokens=1),
        _next("k", "0:3", 0, "b"),
    ]
    assert _tokens(assemble(preds, "next-token")) == {("k", 0): ["a"], ("k", 1): ["b"]}


def test_reset_closes_a_sequence_and_empty_sequences_keep_their_number() -> None:
    preds = [
        _control("k", "0:0", "reset", seq=1),  # nothing before it: sequence 0 has no line
        _next("k", "0:1", 0, "a", seq=1),
        _control("k", "0:2", "reset", seq=2),
        _next("k", "0:3", 0, "b", seq=2),
        _control("k", "0:4", "end", seq=2, n_tokens=1),
        _next("k", "0:5", 0, "c"),  # open sequence, no end yet
    ]
    assert _tokens(assemble(preds, "next-token")) == {
        ("k", 1): ["a"],
        ("k", 2): ["b"],
        ("k", 3): ["c"],
    }


def test_partitions_order_before_offsets() -> None:
    preds = [
        _next("k", "1:0", 0, "later"),
        _control("k", "0:7", "end", n_tokens=1),
        _next("k", "0:5", 0, "first"),
    ]
    assert _tokens(assemble(preds, "next-token")) == {("k", 0): ["first"], ("k", 1): ["later"]}


def test_classify_and_seq2seq_lines_close_at_their_result() -> None:
    label = {"label": "x", "probs": {"x": 0.75, "y": 0.25}}
    preds = [
        _control("k", "0:1", "estimate", probs={"x": 0.5, "y": 0.5}),
        _control("k", "0:2", "label", **label),
        _control("k", "0:4", "label", label="y", probs={"x": 0.0, "y": 1.0}),
        _control("k", "0:3", "estimate", probs={"x": 0.1, "y": 0.9}),
    ]
    lines = assemble(preds, "classify")
    assert lines == {
        ("k", 0): {"key": "k", "model_version": "m", **label},
        ("k", 1): {"key": "k", "model_version": "m", "label": "y", "probs": {"x": 0.0, "y": 1.0}},
    }
    out = {"output": "ab", "output_tokens": ["a", "b"]}
    translated = assemble(
        [_control("k", "0:2", "translation", **out), _control("k", "0:5", "translation", **out)],
        "seq2seq",
    )
    assert sorted(translated) == [("k", 0), ("k", 1)]


def test_tag_lines_follow_positions() -> None:
    preds = [
        {**_control("k", f"0:{i}", "tag"), "pos": i, "tag": t, "prob": 0.5}
        for i, t in enumerate(["N", "V", "N"])
    ]
    preds.append(_control("k", "0:3", "end", n_tokens=3))
    random.Random(1).shuffle(preds)
    (line,) = assemble(preds, "tag").values()
    assert line["tags"] == ["N", "V", "N"] and line["tag_probs"] == [0.5] * 3


def test_ids_that_are_not_source_positions_fall_back_to_seq() -> None:
    preds = [
        _next("k", "e2", 1, "b"),
        _next("k", "e1", 0, "a"),
        _next("k", "e3", 0, "c", seq=1),
        _next("j", "x:y", 0, "z"),
    ]
    assert _tokens(assemble(preds, "next-token")) == {
        ("k", 0): ["a", "b"],
        ("k", 1): ["c"],
        ("j", 0): ["z"],
    }


def test_collected_lines_are_sorted_by_key_then_sequence() -> None:
    preds = [
        _next("b", "0:0", 0, "x"),
        _next("a", "0:5", 0, "second"),
        _control("a", "0:2", "end", n_tokens=1),
        _next("a", "0:1", 0, "first"),
    ]
    lines = to_lines(preds)
    assert [(line["key"], line["next"][0]["tokens"]) for line in lines] == [
        ("a", ["first"]),
        ("a", ["second"]),
        ("b", ["x"]),
    ]


def test_chunk_predictions_expand_into_the_per_token_ones() -> None:
    from stream_rnn.engine.assemble import expand_chunk

    chunk = {
        **_control("k", "0:7", "next_chunk", seq=2),
        "pos": 3,
        "pos_to": 4,
        "next": [{"tokens": ["a"], "probs": [0.5]}, {"tokens": ["b"], "probs": [0.25]}],
        "latency_s": 0.1,
    }
    rows = list(expand_chunk(chunk))
    assert rows == [
        {**_next("k", "0:7", 3, "a", seq=2), "latency_s": 0.1, "next": {"tokens": ["a"], "probs": [0.5]}},
        {**_next("k", "0:7", 4, "b", seq=2), "latency_s": 0.1, "next": {"tokens": ["b"], "probs": [0.25]}},
    ]  # fmt: skip
    estimate = {**_control("k", "0:8", "estimate_chunk"), "pos": 0, "pos_to": 1,
                "label": ["x", "y"], "probs": [{"x": 0.6, "y": 0.4}, {"x": 0.3, "y": 0.7}]}  # fmt: skip
    assert [(p["type"], p["pos"], p["label"], p["probs"]["y"]) for p in expand_chunk(estimate)] == [
        ("estimate", 0, "x", 0.4),
        ("estimate", 1, "y", 0.7),
    ]
    with pytest.raises(EngineError, match=r"covers positions 3..4 but carries \[1\] entries"):
        list(expand_chunk({**chunk, "next": chunk["next"][:1]}))


def _chunk(key: str, ident: str, pos: int, tokens: str, seq: int = 0) -> dict[str, Any]:
    return {
        **_control(key, ident, "next_chunk", seq=seq),
        "pos": pos,
        "pos_to": pos + len(tokens) - 1,
        "next": [{"tokens": [t], "probs": [1.0]} for t in tokens],
    }


def test_chunked_predictions_assemble_like_per_token_ones() -> None:
    per_token = [
        _next("k", "0:1", 0, "a"),
        _next("k", "0:2", 1, "b"),
        _next("k", "0:3", 2, "c"),
        _control("k", "0:4", "end", n_tokens=3),
        _next("k", "0:5", 0, "d"),
        _next("j", "1:0", 0, "x"),
        _next("j", "1:1", 1, "y"),
    ]
    chunked = [
        _chunk("k", "0:1", 0, "ab"),
        _next("k", "0:2", 2, "c"),
        _control("k", "0:3", "end", n_tokens=3),
        _chunk("k", "0:4", 0, "d"),
        _chunk("j", "1:0", 0, "xy"),
        _chunk("j", "1:0", 0, "xy"),  # a duplicate (at-least-once): dropped by (id, type)
    ]
    random.Random(5).shuffle(chunked)
    assert to_lines(chunked) == to_lines(per_token)
    assert _tokens(assemble(chunked, "next-token")) == {
        ("k", 0): ["a", "b", "c"], ("k", 1): ["d"], ("j", 0): ["x", "y"],
    }  # fmt: skip
    tags = [{**_control("k", "0:0", "tag_chunk"), "pos": 0, "pos_to": 2,
             "tag": ["N", "V", "N"], "prob": [0.5, 0.25, 0.125]}]  # fmt: skip
    (line,) = assemble(tags, "tag").values()
    assert line["tags"] == ["N", "V", "N"] and line["tag_probs"] == [0.5, 0.25, 0.125]
