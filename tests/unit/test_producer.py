"""Producer without a broker: delivery accounting, rate limiting, event order, topic layout."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.errors import (
    KafkaConfigurationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NotLeaderForPartitionError,
)
from kafka.future import Future

from stream_rnn.ops.settings import Settings
from stream_rnn.producer import (
    DELIVERY_TIMEOUT_MS,
    FLUSH_MARGIN_S,
    TokenBucket,
    TokenProducer,
    produce_records,
)
from stream_rnn.stream.collect import infer_task, to_lines
from stream_rnn.stream.exceptions import StreamError
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

    def send_end(self, key: str, label: str | None = None) -> None:
        self.sent.append(("end", key, label))

    def flush(self) -> None:
        self.flushed += 1


class FakeClient:
    """Stands in for kafka-python's KafkaProducer; returns its real futures, resolved by hand.

    ``fail_now`` makes the next send return an already failed future (kafka-python does so
    when the topic's metadata cannot be fetched); ``flush_error`` is raised by ``flush``.
    """

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.futures: list[Future] = []
        self.records: list[tuple[str, bytes | None, bytes | None]] = []
        self.fail_now: BaseException | None = None
        self.send_error: BaseException | None = None
        self.flush_error: BaseException | None = None
        self.flush_timeouts: list[float | None] = []
        self.closed = False

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Future:
        if self.send_error is not None:
            raise self.send_error
        self.records.append((topic, key, value))
        future = Future()
        if self.fail_now is not None:
            future.failure(self.fail_now)
        self.futures.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flush_timeouts.append(timeout)
        if self.flush_error is not None:
            raise self.flush_error

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def fake_producer(**config: Any) -> tuple[TokenProducer, FakeClient]:
    made: list[FakeClient] = []

    def factory(**options: Any) -> FakeClient:
        made.append(FakeClient(**options))
        return made[-1]

    producer = TokenProducer("broker:9092", "tokens", client_factory=factory, **config)
    return producer, made[0]


def test_client_is_idempotent_and_retries_through_a_restart() -> None:
    producer, client = fake_producer()
    cfg = client.config
    assert cfg["bootstrap_servers"] == "broker:9092"
    assert cfg["enable_idempotence"] is True and cfg["acks"] == "all"
    assert cfg["max_in_flight_requests_per_connection"] <= 5  # order kept through retries
    assert cfg["delivery_timeout_ms"] == DELIVERY_TIMEOUT_MS >= 60_000
    assert cfg.get("retries", float("inf")) > 1000
    # every option is one kafka-python knows (a typo would raise only against a real client)
    assert set(cfg) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert producer.flush_timeout_s == DELIVERY_TIMEOUT_MS / 1000 + FLUSH_MARGIN_S


def test_user_config_overrides_the_defaults() -> None:
    producer, client = fake_producer(
        linger_ms=50, delivery_timeout_ms=30_000, enable_idempotence=False, acks=1
    )
    assert client.config["linger_ms"] == 50 and client.config["acks"] == 1
    assert client.config["enable_idempotence"] is False
    assert producer.flush_timeout_s == 30 + FLUSH_MARGIN_S
    producer.flush()
    assert client.flush_timeouts == [30 + FLUSH_MARGIN_S]


def test_acknowledged_sends_are_counted() -> None:
    producer, client = fake_producer()
    producer.send_token("a", "x")
    producer.send_token("a", 3, ts=None)
    producer.send_end("b")
    assert (producer.sent, producer.acked, producer.failed, producer.pending) == (3, 0, 0, 3)
    assert [(t, k) for t, k, _ in client.records] == [("tokens", b"a"), ("tokens", b"a"), ("tokens", b"b")]  # fmt: skip
    for future in client.futures:
        future.success(None)
    producer.flush(5.0)
    assert (producer.sent, producer.acked, producer.failed, producer.pending) == (3, 3, 0, 0)
    assert client.flush_timeouts == [5.0]
    producer.close()
    assert client.closed


def test_a_failed_send_makes_flush_send_and_close_raise(caplog: pytest.LogCaptureFixture) -> None:
    producer, client = fake_producer()
    for ch in "abcd":
        producer.send_token("k", ch)
    client.futures[0].success(None)
    with caplog.at_level(logging.ERROR, logger="stream_rnn.producer"):
        client.futures[1].failure(KafkaTimeoutError("Batch expired"))
        client.futures[2].failure(NotLeaderForPartitionError())
    client.futures[3].success(None)
    assert (producer.sent, producer.acked, producer.failed) == (4, 2, 2)
    assert isinstance(producer.first_error, KafkaTimeoutError)
    assert len(caplog.records) == 1  # logged once, counted always

    with pytest.raises(StreamError, match=r"2 of 4 events sent to 'tokens' failed") as info:
        producer.flush()
    assert "Batch expired" in str(info.value) and "send the sequences again" in str(info.value)
    # an app keeps producing: it is stopped at once, nothing more goes out
    with pytest.raises(StreamError, match="2 of 4 events"):
        producer.send_token("k", "e")
    assert producer.sent == 4 and len(client.records) == 4
    with pytest.raises(StreamError, match="2 of 4 events"):
        producer.flush()  # the failure stays reported
    with pytest.raises(StreamError, match="2 of 4 events"):
        producer.close()
    assert client.closed
    producer.close()  # a second close does nothing
    with pytest.raises(StreamError, match="is closed"):
        producer.send_token("k", "f")


def test_a_future_that_failed_before_the_errback_is_counted() -> None:
    producer, client = fake_producer()
    client.fail_now = KafkaTimeoutError("no metadata for topic")
    producer.send_end("k")
    assert (producer.sent, producer.acked, producer.failed, producer.pending) == (1, 0, 1, 0)
    with pytest.raises(StreamError, match="1 of 1 events .*no metadata for topic"):
        producer.send_end("k")


def test_a_flush_timeout_says_how_many_are_unacknowledged() -> None:
    producer, client = fake_producer()
    for ch in "abc":
        producer.send_token("k", ch)
    client.futures[0].success(None)
    client.flush_error = KafkaTimeoutError("Timeout waiting for future")
    with pytest.raises(StreamError, match=r"2 of 3 events sent to 'tokens' were not acknowledged within 7s"):  # fmt: skip
        producer.flush(7.0)
    with pytest.raises(StreamError, match="not acknowledged"):
        producer.close()
    assert client.closed  # closed even though the flush failed


def test_a_send_the_client_refuses_raises_and_is_not_counted() -> None:
    producer, client = fake_producer()
    client.send_error = KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
    with pytest.raises(StreamError, match="could not send an event for key 'k' to 'tokens'"):
        producer.send_end("k")
    assert producer.sent == 0


def test_invalid_key_is_refused_before_sending() -> None:
    producer, client = fake_producer()
    with pytest.raises(ValueError, match="non-empty string"):
        producer.send_end("")
    assert client.records == []


def test_leaving_the_block_reports_failures_but_keeps_the_apps_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer, client = fake_producer()
    with pytest.raises(StreamError, match="1 of 1 events"), producer:
        producer.send_end("k")
        client.futures[0].failure(KafkaTimeoutError("Batch expired"))
    assert client.closed

    producer, client = fake_producer()
    with pytest.raises(KeyError), caplog.at_level(logging.ERROR), producer:
        producer.send_end("k")
        client.futures[0].failure(KafkaTimeoutError("Batch expired"))
        raise KeyError("app bug")
    assert client.closed and "1 of 1 events" in caplog.text

    caplog.clear()
    producer, client = fake_producer()
    with pytest.raises(StreamError, match="1 of 1 events"), caplog.at_level(logging.ERROR):
        with producer:
            producer.send_end("k")
            client.futures[0].failure(KafkaTimeoutError("Batch expired"))
            producer.flush()  # raises the report; leaving the block does not repeat it
    assert "while handling" not in caplog.text


def test_client_errors_at_construction_become_stream_errors() -> None:
    def refuse(exc: Exception) -> Any:
        def factory(**options: Any) -> FakeClient:
            raise exc

        return factory

    with pytest.raises(StreamError, match="cannot reach Kafka at broker:9092"):
        TokenProducer("broker:9092", client_factory=refuse(KafkaConnectionError("no brokers")))
    with pytest.raises(StreamError, match="enable_idempotence=False"):
        TokenProducer("broker:9092", client_factory=refuse(KafkaConfigurationError("acks=1")))


def test_produce_records_raises_when_an_event_was_lost() -> None:
    producer, client = fake_producer()
    records = [Record("a", text="hi"), Record("b", text="yo")]
    client.fail_now = KafkaTimeoutError("Batch expired")
    with pytest.raises(StreamError, match="1 of 1 events"):
        produce_records(records, producer)  # stops at the second event: the first failed
    assert len(client.records) == 1

    producer, client = fake_producer()
    client.flush_error = None
    assert produce_records(records, producer) == 6
    for future in client.futures:
        future.success(None)
    producer.close()
    assert (producer.sent, producer.acked, producer.failed) == (6, 6, 0)


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
    records = [
        Record("a", text="hi", label="en"),
        Record("b", tokens=["x", 7]),
        Record("a", text="o"),
    ]
    count = produce_records(records, sink, level="char")  # type: ignore[arg-type]
    assert count == 8 and sink.flushed == 1
    assert sink.sent == [
        ("token", "a", "h"), ("token", "a", "i"), ("end", "a", "en"),  # the label rides along
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
