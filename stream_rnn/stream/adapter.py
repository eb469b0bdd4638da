"""Kafka-free glue between raw records and the engine: decode, dead-letter, encode.

A worker hands a poll's raw records to `Adapter.process` with its engine: `Adapter.decode`
resolves tokens with the tables the engine serves now (``engine.served``), the engine runs the
events (refusing them if a swap came in between), and `Adapter.finish` turns the result into
encoded prediction and dead-letter messages. The adapter holds no model table of its own, so
a hot swap (another vocabulary, other labels) can never leave it encoding for an old model.
Everything rejected, by the decoder or by the engine, becomes a dead letter that carries the
original bytes and ``partition:offset``. No Kafka client is imported here, so the whole path is
unit-testable (and the simulator or a benchmark can drive it).

>>> from stream_rnn.train.vocab import Vocab
>>> adapter, vocab = Adapter(), Vocab.from_tokens(["a", "b"], "char")
>>> raw = RawRecord(b"u1", b'{"v":1,"type":"token","token":"a"}', "t", 0, 7)
>>> batch = adapter.decode([raw], vocab)
>>> batch.events[0].key, batch.events[0].token, batch.events[0].id, batch.dead_letters
('u1', 4, '0:7', [])
>>> raw = RawRecord(b"u1", b'{"v":1,"type":"tokens","tokens":["a",5]}', "t", 0, 8)
>>> adapter.decode([raw], vocab).events[0].tokens
[4, 5]
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import END, GENERATE, RESET, TOKEN, BatchResult, Event, GenerateParams
from stream_rnn.stream.codec import (
    DEFAULT_MAX_BYTES,
    decode_batch,
    decode_key,
    encode_dead_letter,
    resolve_token,
    resolve_tokens,
)
from stream_rnn.stream.encoder import PredictionEncoder
from stream_rnn.stream.exceptions import Rejected
from stream_rnn.stream.messages import (
    DEFAULT_MAX_CHUNK_TOKENS,
    EndEvent,
    GenerateEvent,
    ResetEvent,
    TokenEvent,
    TokensEvent,
)
from stream_rnn.stream.reasons import Reason
from stream_rnn.stream.sensors import CountingSensor, Sensor
from stream_rnn.train.vocab import Vocab

# Below this, logits / temperature overflows float32 for ordinary logits and sampling fails
# (softmax of inf is NaN); the schema only asks for > 0, so the adapter refuses these first.
MIN_TEMPERATURE = 1e-6
_KINDS = {EndEvent: END, ResetEvent: RESET}


@dataclass(slots=True)
class RawRecord:
    """One consumed Kafka record, bytes untouched (``ts``: broker timestamp, seconds)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    ts: float | None = None


@dataclass(slots=True)
class Decoded:
    """A decoded micro-batch: engine events, dead letters so far, and id -> source record."""

    events: list[Event]
    dead_letters: list[tuple[bytes | None, bytes]]
    records: dict[str, RawRecord]
    dead_letter_parts: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Outputs:
    """Encoded messages to produce: ``(key, value)`` pairs per output topic."""

    predictions: list[tuple[bytes, bytes]]
    dead_letters: list[tuple[bytes | None, bytes]]
    tokens: int = 0
    # source (tokens) partition of each prediction / dead letter: under exactly-once, an
    # output goes into the transaction of the partition whose event caused it
    prediction_parts: list[int] = field(default_factory=list)
    dead_letter_parts: list[int] = field(default_factory=list)

    def by_source(
        self,
    ) -> dict[int, tuple[list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]]]]:
        """Predictions and dead letters grouped by source partition, order kept."""
        out: dict[int, tuple[list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]]]] = {}
        for part, msg in zip(self.prediction_parts, self.predictions, strict=True):
            out.setdefault(part, ([], []))[0].append(msg)
        for part, dead in zip(self.dead_letter_parts, self.dead_letters, strict=True):
            out.setdefault(part, ([], []))[1].append(dead)
        return out


class Adapter:
    """Raw records -> engine events -> encoded predictions and dead letters.

    ``unknown`` is the policy for string tokens not in the vocabulary of the model served:
    ``"unk"`` maps them to its ``<unk>`` (as offline scoring does), ``"reject"`` dead-letters
    them (a chunk with one: the whole chunk, the detail naming the token's index).
    ``max_bytes`` bounds a message's value, ``max_tokens`` the tokens of one ``tokens`` chunk.
    The vocabulary is never the adapter's: `process` takes the engine's current ``served``
    tables for each micro-batch.

    Example::

        adapter = Adapter(unknown="reject", max_bytes=4096)
        out = adapter.process(records, engine)
        for key, value in out.predictions: producer.send("predictions", value, key=key)
    """

    def __init__(
        self,
        *,
        unknown: Literal["unk", "reject"] = "unk",
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
        sensor: Sensor | None = None,
        clock: Callable[[], float] = time.time,
        exactly_once: bool = True,
    ) -> None:
        if unknown not in ("unk", "reject"):
            raise ValueError(f"unknown-token policy {unknown!r}; use 'unk' or 'reject'")
        self.unknown: Literal["unk", "reject"] = unknown
        self.max_bytes = max_bytes
        if max_tokens < 1:
            raise ValueError(f"max_tokens (tokens per chunk) must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.encoder = PredictionEncoder()
        self.sensor: Sensor = sensor if sensor is not None else CountingSensor()
        self.clock = clock
        self.exactly_once = exactly_once

    def decode(self, records: Sequence[RawRecord], vocab: Vocab) -> Decoded:
        """Validate and decode ``records``, token strings resolved in ``vocab`` (that of the
        model that will step them); rejected ones become dead letters right away."""
        # A None value (tombstone) is allowed in: decode_batch rejects it as not_json.
        values: list[Any] = [r.value for r in records]
        decoded = decode_batch(values, max_bytes=self.max_bytes, max_tokens=self.max_tokens)
        events: list[Event] = []
        dead: list[tuple[bytes | None, bytes]] = []
        dead_parts: list[int] = []
        by_id: dict[str, RawRecord] = {}
        stoi, unknown = vocab.stoi, self.unknown
        now = self.clock()
        for rec, msg in zip(records, decoded, strict=True):
            try:
                key = decode_key(rec.key)
                if isinstance(msg, Rejected):
                    raise msg
                part = rec.partition
                ident = f"{part}:{rec.offset}"
                # offsets make the engine skip redeliveries (exactly-once effect on state)
                off = rec.offset if self.exactly_once else -1
                if msg.__class__ is TokenEvent:
                    token = msg.token
                    # Fast path: a known string token; everything else gets the precise checks.
                    tid = stoi.get(token) if token.__class__ is str else None
                    if not tid:
                        tid = resolve_token(token, vocab, unknown=unknown)
                    event = Event(key, TOKEN, tid, ident, msg.ts, None, part, off)
                elif msg.__class__ is TokensEvent:
                    tids = resolve_tokens(msg.tokens, vocab, unknown=unknown)
                    event = Event(key, TOKEN, -1, ident, msg.ts, None, part, off, tids)
                elif isinstance(msg, GenerateEvent):
                    gen = _generate_params(msg)
                    event = Event(key, GENERATE, -1, ident, msg.ts, gen, part, off)
                else:
                    event = Event(key, _KINDS[type(msg)], -1, ident, msg.ts, None, part, off)
            except Rejected as err:
                dead.append(self._dead_letter(rec, err.reason, err.detail, now))
                dead_parts.append(rec.partition)
                continue
            events.append(event)
            by_id[ident] = rec
        return Decoded(events, dead, by_id, dead_parts)

    def finish(self, batch: Decoded, result: BatchResult) -> Outputs:
        """Encode the engine's predictions (latency and emit time set) and every dead letter."""
        now = self.clock()
        dead = batch.dead_letters
        dead_parts = batch.dead_letter_parts
        for rejection in result.rejections:
            rec = batch.records[rejection.event.id]
            dead.append(self._dead_letter(rec, rejection.reason, rejection.detail, now))
            dead_parts.append(rec.partition)
        encoder = self.encoder
        keys, values, parts = encoder.encode(result, now)
        preds = list(zip(keys, values, strict=True))
        if preds:
            self.sensor.on_predictions(encoder.types)
            if encoder.latencies:
                self.sensor.on_latency(encoder.latencies)
        if result.skipped:
            self.sensor.on_skipped(result.skipped)
        return Outputs(preds, dead, result.tokens, parts, dead_parts)

    def process(self, records: Sequence[RawRecord], engine: Engine) -> Outputs:
        """`decode`, ``engine.process``, `finish`; reports the batch to the sensor.

        The records are decoded with the tables of the model the engine serves now, and the
        same ``served`` object goes with the events to ``engine.process``: a swap between the
        two (another thread) is refused there rather than stepping ids of one vocabulary
        through another model.

        Automatic garbage collection waits while a batch is processed: its many short-lived
        containers (events, per-token lists of the encoder) die by reference counting at its
        end, whereas a collection in the middle would promote them and set off full
        collections over every object of the process (model, pool, clients). Measured with
        ``simulations/chunk_bench.py`` (chunks of 16): ~140 ms full collections every few
        batches, the mean batch time 1.5x its median; none with the pause.
        """
        started = time.perf_counter()
        with _gc_paused():
            served = engine.served
            batch = self.decode(records, served.vocab)
            stepping = time.perf_counter()
            result = engine.process(batch.events, served)
            self.sensor.on_step(time.perf_counter() - stepping)
            out = self.finish(batch, result)
            by_partition: Counter[int] = Counter()
            for e in batch.events:
                if e.kind == TOKEN:
                    by_partition[e.partition] += 1 if e.tokens is None else len(e.tokens)
        self.sensor.on_batch(len(records), out.tokens, time.perf_counter() - started, by_partition)
        return out

    def _dead_letter(
        self, rec: RawRecord, reason: str, detail: str, now: float
    ) -> tuple[bytes | None, bytes]:
        self.sensor.on_dead_letter(reason)
        value = encode_dead_letter(
            reason=cast(Reason, reason),  # checked against REASONS at run time
            detail=detail,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            value=rec.value,
            ts=now,
        )
        return rec.key, value


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic collection inside (a no-op if the application turned it off itself)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _generate_params(msg: GenerateEvent) -> GenerateParams:
    if not msg.greedy and msg.temperature < MIN_TEMPERATURE:
        raise Rejected(
            "bad_value",
            f"'temperature' {msg.temperature!r} is below {MIN_TEMPERATURE}: sampling would "
            'overflow; send "greedy": true for the most likely tokens, or a larger temperature',
        )
    return GenerateParams(msg.n, msg.temperature, msg.top_k, msg.greedy, msg.seed)
