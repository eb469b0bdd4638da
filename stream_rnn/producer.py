"""Push tokens to the tokens topic from an application (kafka-python, no faust, no asyncio).

Every event is validated exactly as the worker validates it before it is sent, so a producer
bug raises `Rejected` here instead of filling the dead-letter topic. The message key is the
sequence key (UTF-8); events of one key keep their order because they share a partition.

Chunks: with ``max_tokens`` > 1 a key's tokens are coalesced into ``tokens`` events (one
message for up to ``max_tokens`` tokens, sent when full, when the first token has waited
``linger_ms``, on `TokenProducer.flush`, or before that key's next control event), so a worker
pays its per-message cost once per chunk; per-key order is kept. The default, 1, sends one
``token`` event per token.

Delivery: the Kafka producer is idempotent with ``acks="all"`` and retries for up to
``delivery_timeout_ms`` (120 s), so a broker restart neither loses, doubles nor reorders
events. An event the broker still did not take is never dropped silently: it is counted in
``failed``, the next `TokenProducer.send` raises `StreamError`, and so do `flush` and `close`.

Example::

    from stream_rnn.producer import TokenProducer

    with TokenProducer("127.0.0.1:9092", "stream-rnn.tokens") as producer:
        for ch in "hello":
            producer.send_token("user-1", ch)
        producer.send_end("user-1")
        producer.send_generate("user-2", 20, temperature=0.8, seed=7)
    # leaving the block flushes and closes; it raises StreamError if any event was lost

    # chunks of up to 16 tokens; a key's tokens wait at most 5 ms for company
    with TokenProducer("127.0.0.1:9092", max_tokens=16, linger_ms=5) as producer:
        producer.send_tokens("user-1", list("hello"))  # one `tokens` event, sent within 5 ms
        producer.send_end("user-1")  # sends user-1's open chunk first, then the end
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaConfigurationError, KafkaError

from stream_rnn.stream.coalesce import Chunk, Coalescer
from stream_rnn.stream.codec import DEFAULT_MAX_BYTES, encode_event
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.messages import (
    DEFAULT_MAX_CHUNK_TOKENS,
    EndEvent,
    Event,
    GenerateEvent,
    ResetEvent,
    TokenEvent,
    TokensEvent,
)
from stream_rnn.train.data import Record, records_to_events
from stream_rnn.train.vocab import Level

Now = Literal["now"]
DELIVERY_TIMEOUT_MS = 120_000
# flush() waits a little longer than the delivery timeout: by then every event has either been
# acknowledged or failed, so a flush with the default timeout ends with a definite answer.
FLUSH_MARGIN_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # after a flush there is nothing left to wait for but the sender thread

_log = logging.getLogger(__name__)


class DeliveryFuture(Protocol):
    """The part of kafka-python's ``FutureRecordMetadata`` that `TokenProducer` uses."""

    def add_callback(self, f: Callable[[Any], object]) -> object: ...

    def add_errback(self, f: Callable[[BaseException], object]) -> object: ...


class ProducerClient(Protocol):
    """The part of kafka-python's ``KafkaProducer`` that `TokenProducer` uses (tests fake it)."""

    def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> DeliveryFuture: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


ClientFactory = Callable[..., ProducerClient]


class TokenProducer:
    """Sends token and control events for sequence keys; no event is lost without an error.

    ``ts`` defaults to the send time (the worker reports ``latency_s`` from it); pass a number
    to replay recorded times, or None to send no timestamp.

    The Kafka client is idempotent, ``acks="all"``, with at most 5 requests in flight per
    connection and unbounded retries within ``delivery_timeout_ms`` (120 s): a key's events
    arrive once and in order through broker restarts. ``**config`` (kafka-python
    ``KafkaProducer`` options) overrides any of these; a setting that contradicts idempotence
    raises `StreamError` unless ``enable_idempotence=False`` is passed too.
    ``client_factory`` builds the client from those keyword options (tests pass a fake).

    Chunks: ``max_tokens`` > 1 coalesces each key's tokens into ``tokens`` events of up to
    ``max_tokens`` tokens (keep it within the workers' ``max_chunk_tokens``, 256 by default)
    and ``max_bytes`` bytes (their ``max_message_bytes``). A chunk goes out when full, when its
    first token has waited ``linger_ms`` (a background thread sends it), at `flush` / `close`,
    or before the key's next control event, so each key's events keep their order. A chunk's
    ``ts`` is its first token's; a chunk of one token goes out as a ``token`` event.
    ``linger_ms`` is also the Kafka client's linger. ``sent``, ``acked``, ``failed`` count
    messages (a chunk is one); ``buffered`` counts tokens waiting in open chunks.

    Failures: each send registers a callback and an errback; ``sent``, ``acked`` and
    ``failed`` count the events (``pending`` is the rest). Once an event has failed, `send`
    raises `StreamError` instead of sending more into a topic that does not take them (the
    failure is seen as soon as the client reports it, at the latest at the next `flush`);
    `flush` and `close` raise it too, naming how many failed and the first error.

    Example::

        producer = TokenProducer("127.0.0.1:9092", "stream-rnn.tokens", max_block_ms=10_000)
        try:
            producer.send_token("user-1", "a")
        finally:
            producer.close()  # raises StreamError if an event failed: "1 of 1 events sent to ..."
        print(producer.sent, producer.acked, producer.failed)
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "stream-rnn.tokens",
        *,
        linger_ms: int = 5,
        max_tokens: int = 1,
        max_bytes: int = DEFAULT_MAX_BYTES,
        client_factory: ClientFactory = KafkaProducer,
        clock: Callable[[], float] = time.monotonic,
        **config: Any,
    ) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(
                f"max_tokens must be an integer >= 1 (1: no chunks), got {max_tokens!r}"
            )
        if not linger_ms >= 0:
            raise ValueError(f"linger_ms must be >= 0, got {linger_ms!r}")
        self.max_tokens = max_tokens
        self._chunks = Coalescer(max_tokens, linger_ms / 1000, max_bytes=max_bytes)
        self._clock = clock
        # One lock orders every send: a key's chunk (sent by the linger thread or by the app
        # thread) and its next events reach the client in the order they were sent.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._linger_thread: threading.Thread | None = None
        self._stopping = False
        options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": "stream-rnn-producer",
            "enable_idempotence": True,
            "acks": "all",
            # retries stay at the library default (unbounded): delivery_timeout_ms bounds them.
            "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
            "max_in_flight_requests_per_connection": 5,  # idempotence keeps order up to 5
            # Reconnect within a second of a broker coming back, not up to 30 s later.
            "reconnect_backoff_max_ms": 1000,
            "linger_ms": linger_ms,
            "batch_size": 256 * 1024,
            **config,
        }
        self.flush_timeout_s = options["delivery_timeout_ms"] / 1000 + FLUSH_MARGIN_S
        try:
            self._client = client_factory(**options)
        except KafkaConfigurationError as err:
            raise StreamError(
                f"invalid producer settings ({err}); idempotence needs acks='all', retries > 0 "
                "and max_in_flight_requests_per_connection <= 5: drop the conflicting option "
                "or pass enable_idempotence=False as well"
            ) from err
        except KafkaError as err:
            raise StreamError(
                f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka "
                "up) or pass --bootstrap HOST:PORT"
            ) from err
        # `sent` is written by the sending thread, `acked`/`failed` by the client's I/O thread
        # (one writer each, so plain ints suffice).
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.first_error: BaseException | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Events sent but neither acknowledged nor failed yet."""
        return self.sent - self.acked - self.failed

    @property
    def buffered(self) -> int:
        """Tokens waiting in open chunks (always 0 with ``max_tokens`` 1)."""
        return self._chunks.buffered

    def send(self, key: str, event: Event) -> None:
        """Validate, encode and send one event for ``key`` (asynchronous; see `flush`);
        the key's open chunk, if any, goes out before it.

        Raises:
            ValueError, Rejected: the key or the event is invalid (nothing was sent).
            StreamError: an earlier event failed, the producer is closed, or the client
                could not take the event (e.g. no metadata for the topic within max_block_ms).
        """
        self._check(key)
        # a `tokens` event of the caller's own: within the workers' default limit, or this
        # producer's max_tokens if that is larger (the workers are then configured for it)
        value = encode_event(event, max_tokens=max(self.max_tokens, DEFAULT_MAX_CHUNK_TOKENS))
        with self._lock:
            chunk = self._chunks.take(key)
            if chunk is not None:
                self._send_chunks([chunk])
            self._send_value(key, value)

    def send_token(self, key: str, token: str | int, ts: float | None | Now = "now") -> None:
        """One token: a string is looked up in the model's vocabulary, an int is a token id.

        With ``max_tokens`` > 1 it joins the key's open chunk (see the class docstring)."""
        if self.max_tokens == 1:
            self.send(key, TokenEvent(token, _ts(ts)))
        else:
            self.send_tokens(key, [token], ts)

    def send_tokens(
        self, key: str, tokens: Sequence[str | int], ts: float | None | Now = "now"
    ) -> None:
        """Several tokens of ``key``, in order: with ``max_tokens`` > 1 they join the key's
        open chunk (full chunks go out at once), else each goes out as a ``token`` event.

        Raises:
            ValueError, Rejected: the key or a token is invalid (none of them was sent).
            StreamError: as `send`.
        """
        if self.max_tokens == 1:
            events = [TokenEvent(token, _ts(ts)) for token in tokens]
            for event in events:
                encode_event(event)  # all checked before any goes out
            for event in events:
                self.send(key, event)
            return
        self._check(key)
        sent_at = _ts(ts)
        with self._lock:
            was_idle = not len(self._chunks)
            self._send_chunks(self._chunks.add(key, tokens, sent_at, self._clock()))
            if len(self._chunks):
                if self._linger_thread is None:
                    self._linger_thread = threading.Thread(
                        target=self._linger, name="stream-rnn-producer-linger", daemon=True
                    )
                    self._linger_thread.start()
                elif was_idle:
                    self._wake.notify()  # it waits for a first chunk with no deadline

    def send_end(self, key: str, ts: float | None | Now = "now", label: str | None = None) -> None:
        """Close the key's sequence (classify and seq2seq models answer at this point);
        ``label``: the sequence's ground truth, kept by ``stream-rnn record`` for retraining."""
        self.send(key, EndEvent(_ts(ts), label=label))

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

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every event sent so far is acknowledged or has failed.

        ``timeout_s`` defaults to ``flush_timeout_s`` (the delivery timeout plus a margin).

        Raises:
            StreamError: some events were not acknowledged in time, or any event sent by
                this producer so far failed (failures stay reported: flush raises again).
        """
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            try:
                self._send_chunks(self._chunks.drain())
            except StreamError:  # counted as failed: reported below with the others
                pass
        try:
            self._client.flush(timeout=timeout)
        except KafkaError as err:
            raise StreamError(
                f"{self.pending} of {self.sent} events sent to {self.topic!r} were not "
                f"acknowledged within {timeout:.0f}s ({err}); {self.failed} failed. Check the "
                f"broker at {self.bootstrap} and the topic, then send those events again"
            ) from err
        self._raise_if_failed()

    def close(self, timeout_s: float | None = None) -> None:
        """Flush, then disconnect (always); raises as `flush` does. A second call does nothing."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            self._closed = True
            with self._lock:
                self._stopping = True
                self._wake.notify()
                for chunk in self._chunks.drain():  # only if the flush failed half way
                    self._lost(chunk, StreamError("the producer closed before it was sent"))
            if self._linger_thread is not None:
                self._linger_thread.join(CLOSE_TIMEOUT_S)
            try:
                self._client.close(timeout=CLOSE_TIMEOUT_S)
            except KafkaError as err:  # the flush above already said what was lost
                _log.warning("closing the Kafka producer for %r: %s", self.topic, err)

    def _check(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"the sequence key must be a non-empty string, got {key!r:.40}")
        if self._closed:
            raise StreamError(f"this producer for {self.topic!r} is closed; create a new one")
        self._raise_if_failed()

    def _send_value(self, key: str, value: bytes) -> None:
        """Hand one encoded event to the client (the caller holds the lock)."""
        try:
            future = self._client.send(self.topic, value=value, key=key.encode("utf-8"))
        except KafkaError as err:
            raise StreamError(
                f"could not send an event for key {key!r:.40} to {self.topic!r} at "
                f"{self.bootstrap} ({err}); check that the broker is up and the topic exists"
            ) from err
        self.sent += 1  # before the errback, which runs at once on an already failed future
        future.add_callback(self._on_ack)
        future.add_errback(self._on_error)

    def _send_chunks(self, chunks: list[Chunk]) -> None:
        """Send closed chunks in order: a ``token`` event for one token, else a ``tokens``
        event. Their tokens were sent by earlier calls too, so a chunk the client refuses is
        counted as failed (every later call raises), and so are the chunks after it; then
        the client's error is raised."""
        for i, chunk in enumerate(chunks):
            if len(chunk.tokens) == 1:
                event: Event = TokenEvent(chunk.tokens[0], chunk.ts)
            else:
                event = TokensEvent(chunk.tokens, chunk.ts)
            try:
                self._send_value(chunk.key, encode_event(event, max_tokens=self.max_tokens))
            except StreamError as err:  # Rejected included (tokens were checked: a bug)
                for lost in chunks[i:]:
                    self._lost(lost, err)
                raise

    def _linger(self) -> None:
        """The linger thread: sends every chunk whose first token has waited ``linger_ms``."""
        with self._wake:
            while not self._stopping:
                deadline = self._chunks.next_deadline()
                now = self._clock()
                if deadline is None or deadline > now:
                    self._wake.wait(None if deadline is None else deadline - now)
                    continue
                try:
                    self._send_chunks(self._chunks.due(now))
                except StreamError:  # counted as failed: the app's next call raises it
                    pass

    def _lost(self, chunk: Chunk, err: BaseException) -> None:
        """Count a chunk that could not be handed to the client as a sent, failed event."""
        self.sent += 1
        self._on_error(err)

    def _on_ack(self, _metadata: object) -> None:
        self.acked += 1

    def _on_error(self, err: BaseException) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = err
            # once: a broker outage can fail thousands of events, each counted in `failed`
            _log.error("an event to %r was not delivered: %r", self.topic, err)

    def _raise_if_failed(self) -> None:
        if self.failed:
            raise StreamError(
                f"{self.failed} of {self.sent} events sent to {self.topic!r} failed (first "
                f"error: {self.first_error!r}); they are not in the topic. Check the broker at "
                f"{self.bootstrap} and the topic, then send the sequences again from a new "
                "producer (the worker may have seen a key's events only in part)"
            )

    def __enter__(self) -> TokenProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the exception that left the block; the delivery report goes to the log
            self.close()
        except StreamError as err:
            if str(err) != str(exc):  # not the very report that is already propagating
                _log.error("while handling %r: %s", exc, err)


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
    """Send every record as tokens plus an ``end``; returns how many tokens and ends were sent
    (the producer's ``sent`` counts messages: fewer when it coalesces tokens into chunks).

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
        else:  # the label rides on the wire `end`; target/tags stay offline
            label = ev.get("label")
            producer.send_end(key, label=None if label is None else str(label))
        count += 1
    producer.flush()
    return count


def _ts(ts: float | None | Now) -> float | None:
    return time.time() if ts == "now" else ts
