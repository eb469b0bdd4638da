"""Coalescing tokens into chunks: the sans-I/O buffer and the producer that drives it."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError
from test_producer import FakeClient, fake_producer

from stream_rnn.producer import produce_records
from stream_rnn.stream.coalesce import Coalescer
from stream_rnn.stream.codec import decode_event
from stream_rnn.stream.exceptions import Rejected, StreamError
from stream_rnn.stream.messages import TokenEvent, TokensEvent
from stream_rnn.train.data import Record


def _sent(client: FakeClient) -> list[tuple[str, Any]]:
    """``(key, decoded event)`` of every record the fake client took, in order."""
    return [(key.decode(), decode_event(value)) for _, key, value in client.records]  # type: ignore[union-attr, arg-type]


def _tokens(events: list[tuple[str, Any]], key: str) -> list[str | int]:
    out: list[str | int] = []
    for k, ev in events:
        if k == key and isinstance(ev, TokensEvent):
            out += ev.tokens
        elif k == key and isinstance(ev, TokenEvent):
            out.append(ev.token)
    return out


def test_chunks_close_on_count_and_keep_their_first_ts() -> None:
    c = Coalescer(max_tokens=3, linger_s=1.0)
    assert c.add("a", ["x", "y"], ts=5.0, now=0.0) == []
    assert c.add("b", [1], ts=6.0, now=0.1) == []
    (full,) = c.add("a", ["z", "w"], ts=7.0, now=0.2)
    assert (full.key, full.tokens, full.ts) == ("a", ["x", "y", "z"], 5.0)
    assert (len(c), c.buffered) == (2, 2)  # a's new chunk (w, ts 7) and b's
    assert [(ch.key, ch.tokens, ch.ts) for ch in c.drain()] == [("b", [1], 6.0), ("a", ["w"], 7.0)]
    assert (len(c), c.buffered, c.next_deadline()) == (0, 0, None)


def test_chunks_close_when_they_have_lingered_oldest_first() -> None:
    c = Coalescer(max_tokens=100, linger_s=0.005)
    c.add("a", ["x"], None, now=10.0)
    c.add("b", ["y"], None, now=10.002)
    c.add("a", ["z"], None, now=10.004)  # joins a's chunk: a's deadline stays 10.005
    assert c.next_deadline() == pytest.approx(10.005)
    assert c.due(10.0049) == []
    assert [(ch.key, ch.tokens) for ch in c.due(10.0051)] == [("a", ["x", "z"])]
    assert [(ch.key, ch.tokens) for ch in c.due(11.0)] == [("b", ["y"])]
    assert c.due(12.0) == [] and c.take("a") is None


def test_a_control_takes_its_keys_chunk_only() -> None:
    c = Coalescer(max_tokens=10, linger_s=1.0)
    c.add("a", ["x"], None, 0.0)
    c.add("b", ["y"], None, 0.0)
    taken = c.take("a")
    assert taken is not None and taken.tokens == ["x"] and c.take("a") is None
    assert [ch.key for ch in c.drain()] == ["b"]


def test_chunks_stay_within_the_message_size() -> None:
    c = Coalescer(max_tokens=1000, linger_s=1.0, max_bytes=200)
    closed = c.add("a", ["x" * 30] * 10, None, 0.0)
    assert closed and all(len(ch.tokens) > 1 for ch in closed)
    for ch in [*closed, *c.drain()]:
        data = orjson.dumps({"v": 1, "type": "tokens", "tokens": ch.tokens, "ts": -1.7976931348623157e308})  # fmt: skip
        assert len(data) <= 200
    huge = c.add("b", ["y" * 300, "z"], None, 0.0)  # too big for any chunk: it goes alone
    assert [ch.tokens for ch in huge] == [["y" * 300]]


def test_bad_tokens_add_nothing() -> None:
    c = Coalescer(max_tokens=4, linger_s=1.0)
    for bad, reason in [(True, "wrong_type"), (1.5, "wrong_type"), (None, "wrong_type"), ("\ud800", "not_json")]:  # fmt: skip
        with pytest.raises(Rejected) as info:
            c.add("a", ["ok", bad], None, 0.0)  # type: ignore[list-item]
        assert info.value.reason == reason, info.value.detail
    assert (len(c), c.buffered) == (0, 0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        Coalescer(0, 1.0)
    with pytest.raises(ValueError, match="linger must be >= 0"):
        Coalescer(2, -1.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10**6))
def test_every_token_goes_out_once_in_order(max_tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    c = Coalescer(max_tokens, linger_s=0.01)
    want: dict[str, list[int]] = {}
    got: dict[str, list[int]] = {}
    now = 0.0
    for i in range(200):
        now += rng.random() * 0.004
        key = f"k{rng.randrange(5)}"
        closed = []
        if rng.random() < 0.1:
            taken = c.take(key)
            closed = [taken] if taken else []
        else:
            tokens = list(range(i * 10, i * 10 + rng.randint(1, 4)))
            want.setdefault(key, []).extend(tokens)
            closed = c.add(key, tokens, None, now)
        closed += c.due(now)
        for ch in closed:
            assert 1 <= len(ch.tokens) <= max_tokens
            got.setdefault(ch.key, []).extend(ch.tokens)  # type: ignore[arg-type]
    for ch in c.drain():
        got.setdefault(ch.key, []).extend(ch.tokens)  # type: ignore[arg-type]
    assert got == want and c.buffered == 0


def test_producer_coalesces_and_flushes_a_key_before_its_controls() -> None:
    producer, client = fake_producer(max_tokens=3, linger_ms=60_000)
    for ch in "abcde":
        producer.send_token("u", ch, ts=1.0)
    producer.send_tokens("w", [7, 8], ts=2.0)
    assert producer.buffered == 4 and producer.sent == 1  # only u's full chunk went out
    producer.send_end("u")  # u's open chunk goes first
    producer.send_generate("w", 3)
    assert producer.buffered == 0
    events = _sent(client)
    assert events == [
        ("u", TokensEvent(["a", "b", "c"], 1.0)),
        ("u", TokensEvent(["d", "e"], 1.0)),
        ("u", events[2][1]),
        ("w", TokensEvent([7, 8], 2.0)),
        ("w", events[4][1]),
    ]
    assert [type(ev).__name__ for _, ev in events[2::2]] == ["EndEvent", "GenerateEvent"]
    producer.send_token("z", "q", ts=None)
    producer.flush()  # a lone token goes out as a token event
    assert _sent(client)[-1] == ("z", TokenEvent("q", None))
    assert producer.sent == 6
    producer.close()


def test_the_linger_thread_sends_a_waiting_chunk() -> None:
    producer, client = fake_producer(max_tokens=100, linger_ms=20)
    producer.send_tokens("u", ["a", "b"])
    assert client.records == []
    deadline = time.monotonic() + 5
    while not client.records and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [ev.tokens for _, ev in _sent(client)] == [["a", "b"]]  # type: ignore[union-attr]
    producer.send_tokens("u", ["c", "d"])  # the thread waits for new chunks again
    while len(client.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _tokens(_sent(client), "u") == ["a", "b", "c", "d"]
    producer.close()
    thread = producer._linger_thread
    assert thread is not None and not thread.is_alive()


def test_per_key_order_holds_with_the_linger_thread_racing_the_app() -> None:
    producer, client = fake_producer(max_tokens=4, linger_ms=1)
    rng = random.Random(1)
    want: dict[str, list[int]] = {}
    for i in range(3000):
        key = f"k{rng.randrange(20)}"
        want.setdefault(key, []).append(i)
        producer.send_token(key, i)
        if i % 97 == 0:
            time.sleep(0.002)  # let chunks linger out
    producer.flush()
    events = _sent(client)
    assert {key: _tokens(events, key) for key in want} == want
    assert any(isinstance(ev, TokenEvent) for _, ev in events)  # lingered out alone
    assert any(isinstance(ev, TokensEvent) and len(ev.tokens) == 4 for _, ev in events)
    producer.close()


def test_a_chunk_the_linger_thread_cannot_send_fails_the_next_call() -> None:
    producer, client = fake_producer(max_tokens=10, linger_ms=5)
    client.send_error = KafkaTimeoutError("Failed to update metadata")
    producer.send_tokens("u", ["a", "b"])
    deadline = time.monotonic() + 5
    while not producer.failed and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(StreamError, match="1 of 1 events .*Failed to update metadata"):
        producer.send_token("u", "c")
    client.send_error = None
    with pytest.raises(StreamError, match="1 of 1 events"):
        producer.close()


def test_chunk_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        fake_producer(max_tokens=0)
    with pytest.raises(ValueError, match="linger_ms must be >= 0"):
        fake_producer(linger_ms=-1)
    producer, client = fake_producer(max_tokens=8)
    with pytest.raises(Rejected, match="wrong_type"):
        producer.send_tokens("u", ["a", True])  # type: ignore[list-item]
    assert producer.buffered == 0
    with pytest.raises(ValueError, match="non-empty string"):
        producer.send_token("", "a")
    producer.close()


def test_produce_records_in_chunks_sends_every_token_in_order() -> None:
    producer, client = fake_producer(max_tokens=4, linger_ms=60_000)
    records = [Record(f"k{i}", text="abcdefghij"[: 3 + i]) for i in range(5)]
    count = produce_records(records, producer, interleave_seed=2)
    assert count == sum(len(r.text or "") + 1 for r in records)
    events = _sent(client)
    assert producer.sent == len(events) < count  # fewer messages than tokens
    for r in records:
        mine = [ev for k, ev in events if k == r.key]
        assert _tokens(events, r.key) == list(r.text or "")
        assert type(mine[-1]).__name__ == "EndEvent"  # the end comes after every token
    producer.close()


def test_per_token_producers_send_token_events_for_send_tokens() -> None:
    producer, client = fake_producer()
    producer.send_tokens("u", ["a", 5])
    assert [type(ev).__name__ for _, ev in _sent(client)] == ["TokenEvent", "TokenEvent"]
    with pytest.raises(Rejected):
        producer.send_tokens("u", ["b", 1.5])  # type: ignore[list-item]
    assert len(client.records) == 2  # nothing of the bad call went out
    producer.close()


def test_a_chunk_the_client_refuses_is_counted_as_failed() -> None:
    producer, client = fake_producer(max_tokens=2, linger_ms=60_000)
    producer.send_token("u", "a")  # buffered: nothing sent yet
    client.send_error = KafkaTimeoutError("Failed to update metadata")
    with pytest.raises(StreamError, match="could not send an event for key 'u'"):
        producer.send_token("u", "b")  # fills the chunk, which the client refuses
    assert (producer.sent, producer.failed, producer.buffered) == (1, 1, 0)
    with pytest.raises(StreamError, match="1 of 1 events sent to 'tokens' failed"):
        producer.send_token("u", "c")  # the earlier token "a" is lost: every call says so
    client.send_error = None

    producer, client = fake_producer(max_tokens=10, linger_ms=60_000)
    producer.send_tokens("u", ["a", "b"])
    producer.send_tokens("w", ["c"])
    client.send_error = KafkaTimeoutError("Failed to update metadata")
    with pytest.raises(StreamError, match="2 of 2 events sent to 'tokens' failed"):
        producer.flush()  # both open chunks counted, the report names them
    client.send_error = None
    with pytest.raises(StreamError, match="2 of 2 events"):
        producer.close()
