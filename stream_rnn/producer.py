"""Push tokens to the tokens topic from an application (kafka-python, no faust, no asyncio).

Every event is validated exactly as the worker validates it before it is sent, so a producer
bug raises `Rejected` here instead of filling the dead-letter topic. The message key is the
sequence key (UTF-8); events of one key keep their order because they share a partition.

Example::

    from stream_rnn.producer import TokenProducer

    with TokenProducer("127.0.0.1:9092", "stream-rnn.tokens") as producer:
        for ch in "hello":
            producer.send_token("user-1", ch)
        producer.send_end("user-1")
        producer.send_generate("user-2", 20, temperature=0.8, seed=7)
    # leaving the block flushes and closes
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError

from stream_rnn.stream.codec import encode_event
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.messages import EndEvent, Event, GenerateEvent, ResetEvent, TokenEvent
from stream_rnn.train.data import Record, records_to_events
from stream_rnn.train.vocab import Level

Now = Literal["now"]
FLUSH_TIMEOUT_S = 60.0


class TokenProducer:
    """Sends token and control events for sequence keys (acks=all, batched with a linger).

    ``ts`` defaults to the send time (the worker reports ``latency_s`` from it); pass a number
    to replay recorded times, or None to send no timestamp.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "stream-rnn.tokens",
        *,
        linger_ms: int = 5,
        **config: Any,
    ) -> None:
        self.topic = topic
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap,
                acks="all",
                linger_ms=linger_ms,
                batch_size=256 * 1024,
                client_id="stream-rnn-producer",
                **config,
            )
        except KafkaError as err:
            raise StreamError(
                f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka "
                "up) or pass --bootstrap HOST:PORT"
            ) from err
        self.sent = 0

    def send(self, key: str, event: Event) -> None:
        """Validate, encode and send one event for ``key`` (asynchronous; see `flush`)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"the sequence key must be a non-empty string, got {key!r:.40}")
        self._producer.send(self.topic, value=encode_event(event), key=key.encode("utf-8"))
        self.sent += 1

    def send_token(self, key: str, token: str | int, ts: float | None | Now = "now") -> None:
        """One token: a string is looked up in the model's vocabulary, an int is a token id."""
        self.send(key, TokenEvent(token, _ts(ts)))

    def send_end(self, key: str, ts: float | None | Now = "now") -> None:
        """Close the key's sequence (classify and seq2seq models answer at this point)."""
        self.send(key, EndEvent(_ts(ts)))

    def send_reset(self, key: str, ts: float | None | Now = "now") -> None:
        """Discard the key's open sequence."""
        self.send(key, ResetEvent(_ts(ts)))

    def send_generate(
        self,
        key: str,
        n: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        seed: int | None = None,
        ts: float | None | Now = "now",
    ) -> None:
        """Ask a next-token model to continue the key's sequence by ``n`` tokens."""
        self.send(key, GenerateEvent(n, temperature, top_k, greedy, seed, _ts(ts)))

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Block until every event sent so far is acknowledged by the broker."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as err:
            raise StreamError(
                f"{self.sent} events were sent but not all were acknowledged within "
                f"{timeout_s:.0f}s ({err}); check the broker and the topic {self.topic!r}"
            ) from err

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Flush, then disconnect."""
        self.flush(timeout_s)
        self._producer.close(timeout=timeout_s)

    def __enter__(self) -> TokenProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TokenBucket:
    """Rate limiter: ``take()`` blocks so that at most ``rate`` tokens pass per second.

    The burst is a tenth of a second's worth (at least one), so every sleep is short.

    >>> bucket = TokenBucket(1000.0)
    >>> start = time.monotonic(); _ = [bucket.take() for _ in range(150)]
    >>> 0.03 < time.monotonic() - start < 1.0
    True
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 tokens per second, got {rate}")
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self.clock, self.sleep = clock, sleep
        self._level = self.burst
        self._last = clock()

    def take(self) -> None:
        now = self.clock()
        self._level = min(self.burst, self._level + (now - self._last) * self.rate)
        self._last = now
        if self._level < 1.0:
            self.sleep((1.0 - self._level) / self.rate)
            now = self.clock()
            self._level = min(self.burst, self._level + (now - self._last) * self.rate)
            self._last = now
        self._level -= 1.0


def produce_records(
    records: Sequence[Record],
    producer: TokenProducer,
    *,
    level: Level = "char",
    rate: float | None = None,
    interleave_seed: int | None = None,
) -> int:
    """Send every record as token events plus an ``end``; returns how many events were sent.

    ``text`` is split by ``level`` (the model's vocabulary level). Integer tokens of recorded
    sequences are sent as strings: offline scoring looks them up as ``str(token)``, whereas an
    integer on the wire is a token id. ``interleave_seed`` mixes the sequences at random
    (each key's order kept); ``rate`` limits token events per second. Flushes before returning.
    """
    bucket = TokenBucket(rate) if rate is not None else None
    count = 0
    for ev in records_to_events(records, level=level, interleave_seed=interleave_seed):
        key = ev["key"]
        if ev["type"] == "token":
            if bucket is not None:
                bucket.take()
            token = ev["token"]
            producer.send_token(key, token if isinstance(token, str) else str(token))
        else:  # the record's label/target/tags stay offline: the wire `end` carries none
            producer.send_end(key)
        count += 1
    producer.flush()
    return count


def _ts(ts: float | None | Now) -> float | None:
    return time.time() if ts == "now" else ts
