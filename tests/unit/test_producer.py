"""Producer helpers without a broker: rate limiting, record -> event order, topic layout."""

from __future__ import annotations

from typing import Any

import pytest

from stream_rnn.ops.settings import Settings
from stream_rnn.producer import TokenBucket, produce_records
from stream_rnn.stream.collect import infer_task, to_lines
from stream_rnn.stream.topics import layout, state_topic
from stream_rnn.train.data import Record


class FakeTime:
    """A monotonic clock whose sleep advances it (and records the sleeps)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= 1.0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


class Sink:
    """Collects what produce_records sends (it only needs these three methods)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []
        self.flushed = 0

    def send_token(self, key: str, token: Any) -> None:
        self.sent.append(("token", key, token))

    def send_end(self, key: str) -> None:
        self.sent.append(("end", key, None))

    def flush(self) -> None:
        self.flushed += 1


@pytest.mark.parametrize("rate", [50.0, 1000.0, 20_000.0])
def test_token_bucket_holds_the_rate(rate: float) -> None:
    t = FakeTime()
    bucket = TokenBucket(rate, clock=t.clock, sleep=t.sleep)
    n = int(rate * 3)
    for _ in range(n):
        bucket.take()
    elapsed = t.now - 100.0
    # the first burst (0.1 s worth) is free; after it, exactly `rate` per second
    assert elapsed == pytest.approx((n - max(1.0, rate / 10)) / rate, rel=1e-6)
    assert max(t.sleeps) <= 1.0 / rate + 1e-12


def test_token_bucket_refuses_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(0)


def test_produce_records_sends_tokens_then_end_per_sequence() -> None:
    sink = Sink()
    records = [Record("a", text="hi"), Record("b", tokens=["x", 7]), Record("a", text="o")]
    count = produce_records(records, sink, level="char")  # type: ignore[arg-type]
    assert count == 8 and sink.flushed == 1
    assert sink.sent == [
        ("token", "a", "h"), ("token", "a", "i"), ("end", "a", None),
        ("token", "b", "x"), ("token", "b", "7"), ("end", "b", None),  # ints go as strings
        ("token", "a", "o"), ("end", "a", None),
    ]  # fmt: skip


def test_interleaving_keeps_each_keys_order() -> None:
    sink = Sink()
    records = [Record(f"k{i}", text="abcdef") for i in range(5)]
    produce_records(records, sink, interleave_seed=3)  # type: ignore[arg-type]
    keys = [key for _, key, _ in sink.sent]
    assert keys != sorted(keys)  # actually interleaved
    for i in range(5):
        mine = [(kind, tok) for kind, key, tok in sink.sent if key == f"k{i}"]
        assert mine == [*(("token", c) for c in "abcdef"), ("end", None)]


def test_topic_layout_follows_the_settings() -> None:
    settings = Settings(tokens_topic="in", predictions_topic="out", dead_letter_topic="dl")
    got = layout(settings, partitions=6)
    assert (got.tokens, got.state, got.predictions, got.dead_letters) == (
        "in",
        "in-state",
        "out",
        "dl",
    )
    assert got.partitions == 6 and layout(settings).partitions == settings.partitions
    assert state_topic("stream-rnn.tokens") == "stream-rnn.tokens-state"


def _pred(key: str, seq: int, typ: str, ident: str, **payload: Any) -> dict[str, Any]:
    return {"key": key, "seq": seq, "type": typ, "id": ident, "model_version": "m", **payload}


def test_collected_predictions_become_sorted_score_lines() -> None:
    preds = [
        _pred("b", 0, "next", "0:3", pos=1, next={"tokens": ["y"], "probs": [0.5]}),
        _pred("b", 0, "next", "0:1", pos=0, next={"tokens": ["x"], "probs": [0.25]}),
        _pred("a", 1, "next", "0:7", pos=0, next={"tokens": ["z"], "probs": [1.0]}),
        _pred("a", 0, "next", "0:0", pos=0, next={"tokens": ["w"], "probs": [1.0]}),
        _pred("a", 0, "end", "0:2", pos=None, n_tokens=1),
    ]
    assert infer_task(preds) == "next-token"
    lines = to_lines(preds)
    assert [(line["key"], [s["tokens"] for s in line["next"]]) for line in lines] == [
        ("a", [["w"]]),
        ("a", [["z"]]),
        ("b", [["x"], ["y"]]),
    ]


@pytest.mark.parametrize(
    ("types", "task"),
    [({"label"}, "classify"), ({"estimate", "label"}, "classify"), ({"tag", "end"}, "tag"),
     ({"translation"}, "seq2seq"), ({"reset"}, "next-token")],
)  # fmt: skip
def test_infer_task(types: set[str], task: str) -> None:
    assert infer_task([{"type": t} for t in types]) == task
