"""Replay through a live system: produce the schedule to its tokens topic at the schedule's
timing and read what the workers answer.

Messages go out through `stream_rnn.producer.TokenProducer` (idempotent, acks=all, one message
per token) with ``ts`` = their scheduled wall time, so the workers' own ``latency_s`` counts
from the schedule too. Raw messages (and events the codec refuses) go out byte for byte through
the same Kafka client, so a key's messages keep their order. The client under the producer
remembers where each message landed (``partition:offset``, which is the ``id`` a worker gives
its answers), so predictions and dead letters are matched to the messages by id, and their key
is checked.

A reader thread follows the predictions and dead-letter topics from their end offsets as of
the start, ``read_committed`` (exactly-once workers: each answer once; at-least-once workers may
repeat some, counted as duplicates). The run ends when every message that must be answered was
answered, or when nothing new arrived for ``timeout_s``.

Faults (``faults``, a `stream_rnn.replay.result.FaultHooks` such as
`stream_rnn.replay.injector.FaultInjector`): told when the replay starts and how many messages
went out; while one is due or under way the run neither ends nor times out, so that a worker
taken down mid-stream (or the broker) can come back and answer.

Example::

    result = run_kafka(schedule, bootstrap="127.0.0.1:9092", topics=ReplayTopics(),
                       expected=answer_expected(schedule, tokens=True))
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from stream_rnn.producer import TokenProducer
from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.result import FaultHooks, NoProgress, Output, Progress, ReplayResult
from stream_rnn.replay.schedule import Schedule, Scheduled
from stream_rnn.stream.codec import decode_dead_letter, decode_prediction
from stream_rnn.stream.exceptions import Rejected, StreamError
from stream_rnn.stream.messages import EndEvent, Event, ResetEvent, TokenEvent

POLL_MS = 100
SETTLE_S = 0.5  # after the last expected answer: time for late duplicates to show


@dataclass(frozen=True)
class ReplayTopics:
    """The live system's topics (the settings' defaults)."""

    tokens: str = "stream-rnn.tokens"
    predictions: str = "stream-rnn.predictions"
    dead_letters: str = "stream-rnn.dead-letters"


class _Tracker:
    """The Kafka client under the replay's producer: notes where each message landed.

    `TokenProducer` builds its client through ``client_factory``; this one is a kafka-python
    producer with those options whose sends record ``(partition, offset)`` for the message
    ``index`` the replay set before the send (one thread sends: the producer keeps no chunks).
    """

    def __init__(self, n: int) -> None:
        self.index = -1
        self.partition = [-1] * n
        self.offset = [-1] * n
        self.failed = 0
        self.first_error: BaseException | None = None
        self._client: Any = None

    def connect(self, **options: Any) -> _Tracker:
        self._client = KafkaProducer(**options)
        return self

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any:
        future = self._client.send(topic, value=value, key=key)
        future.add_callback(self._landed, self.index)
        future.add_errback(self._lost, self.index)
        return future

    def flush(self, timeout: float | None = None) -> None:
        self._client.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self._client.close(timeout=timeout)

    def _landed(self, index: int, metadata: Any) -> None:
        self.partition[index], self.offset[index] = metadata.partition, metadata.offset

    def _lost(self, index: int, err: BaseException) -> None:
        self.failed += 1
        self.first_error = self.first_error or err


class _Reader:
    """Follows the answer topics from their current end on a thread of its own."""

    def __init__(self, bootstrap: str, topics: ReplayTopics) -> None:
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                client_id="stream-rnn-replay",
            )
        except KafkaError as err:
            raise ReplayError(
                f"cannot reach Kafka at {bootstrap} ({err}); start the system (stream-rnn kafka "
                "up, stream-rnn worker ...) or pass --bootstrap HOST:PORT"
            ) from err
        self.predictions = topics.predictions
        self.tokens = topics.tokens
        tps: list[TopicPartition] = []
        for topic in (topics.tokens, topics.predictions, topics.dead_letters):
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                self.consumer.close()
                raise ReplayError(
                    f"topic {topic!r} does not exist at {bootstrap}; start a worker (it creates "
                    "its topics) or run `stream-rnn topics create`, and check --topic, "
                    "--predictions-topic and --dead-letter-topic"
                )
            if topic != topics.tokens:
                tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is sent
            self.consumer.position(tp)
        self.got: list[tuple[float, str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-reader", daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self.consumer.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                polled = self.consumer.poll(timeout_ms=POLL_MS, max_records=10_000)
                at = time.monotonic() - self.t0
                for tp, records in polled.items():
                    is_prediction = tp.topic == self.predictions
                    for rec in records:
                        if is_prediction:
                            self.got.append((at, "prediction", decode_prediction(rec.value)))
                        else:
                            self.got.append((at, "dead_letter", decode_dead_letter(rec.value)))
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            self.error = err


def run_kafka(
    schedule: Schedule,
    *,
    bootstrap: str,
    topics: ReplayTopics,
    expected: list[bool],
    timeout_s: float = 30.0,
    progress: Progress | None = None,
    faults: FaultHooks | None = None,
) -> ReplayResult:
    """Produce ``schedule`` to ``topics.tokens`` and collect the answers (see the module)."""
    progress = progress or NoProgress()
    events = schedule.events
    n = len(events)
    fast = schedule.timing.fast
    reader = _Reader(bootstrap, topics)
    tracker = _Tracker(n)
    try:
        producer = TokenProducer(bootstrap, topics.tokens, client_factory=tracker.connect)
    except StreamError as err:
        reader.stop()
        raise ReplayError(str(err)) from err
    sent_at = [math.nan] * n
    progress.start(n, sum(expected))
    start = time.monotonic()
    wall0 = time.time()
    reader.start(start)
    result = ReplayResult("kafka", schedule.timing.describe(schedule.source), sent_at)
    result.wall0 = wall0
    if faults is not None:
        faults.begin(start, n)
    try:
        for i, ev in enumerate(events):
            now = time.monotonic() - start
            if fast:
                sent_at[i] = now
            else:
                if ev.t > now:
                    time.sleep(ev.t - now)
                sent_at[i] = ev.t
            tracker.index = i
            _send(producer, tracker, topics.tokens, ev, wall0 + sent_at[i])
            if faults is not None:
                faults.sent(i + 1)
            if i % 256 == 255:
                progress.update(i + 1, len(reader.got))
        producer.flush()
        result.sent = n
        progress.update(n, len(reader.got))
        _await_answers(result, schedule, reader, tracker, expected, timeout_s, progress, faults)
    except StreamError as err:
        raise ReplayError(f"the replay could not send to {topics.tokens!r}: {err}") from err
    finally:
        try:
            producer.close()
        except StreamError:  # reported above, or counted in send_failed
            pass
        reader.stop()
        progress.close()
    result.send_failed = tracker.failed
    if tracker.failed:
        result.notes.append(
            f"{tracker.failed} messages were not delivered (first error: {tracker.first_error!r})"
        )
    if reader.error is not None:
        raise ReplayError(f"reading the answers failed: {reader.error}") from reader.error
    return result


def _send(producer: TokenProducer, tracker: _Tracker, topic: str, ev: Scheduled, ts: float) -> None:
    key = None if ev.key is None else ev.key.encode()
    if ev.kind != "raw" and ev.key:
        struct: Event
        if ev.kind == "token":
            token = ev.token
            struct = TokenEvent(token if isinstance(token, str) else str(token), ts)
        elif ev.kind == "end":
            struct = EndEvent(ts, label=None if ev.label is None else str(ev.label))
        else:
            struct = ResetEvent(ts)
        try:
            producer.send(ev.key, struct)
            return
        except Rejected:  # refused by the codec: it goes out as it is, for a dead letter
            pass
    tracker.send(topic, value=ev.value, key=key)


def _await_answers(
    result: ReplayResult,
    schedule: Schedule,
    reader: _Reader,
    tracker: _Tracker,
    expected: list[bool],
    timeout_s: float,
    progress: Progress,
    faults: FaultHooks | None = None,
) -> None:
    """Match answers to messages by id until all expected ones came or ``timeout_s`` idle
    (a fault due or under way holds both off)."""
    pairs = enumerate(zip(tracker.partition, tracker.offset, strict=True))
    index_of = {f"{p}:{o}": i for i, (p, o) in pairs if p >= 0}
    want = {i for i in index_of.values() if expected[i]}
    seen: set[tuple[str, str]] = set()
    done = 0
    last_new = time.monotonic()
    finished_at: float | None = None
    while True:
        got = len(reader.got)
        for at, kind, body in reader.got[done:got]:
            ident, key = _identify(kind, body, reader.tokens)
            index = index_of.get(ident) if ident is not None else None
            if index is None:
                result.foreign += 1
                continue
            mark = (ident or "", body["type"] if kind == "prediction" else "dead_letter")
            if mark in seen:
                result.duplicates += 1
                continue
            seen.add(mark)
            if key != schedule.events[index].key:
                result.mismatched_keys += 1
            want.discard(index)
            result.outputs.append(
                Output(index, at, "prediction" if kind == "prediction" else "dead_letter", body)
            )
        if got > done:
            last_new = time.monotonic()
            done = got
            progress.update(result.sent, len(result.outputs))
        now = time.monotonic()
        if faults is not None and faults.busy():
            last_new, finished_at = now, None
        elif not want and finished_at is None:
            finished_at = now
        if finished_at is not None and now - finished_at >= SETTLE_S:
            break
        if want and now - last_new >= timeout_s:
            result.notes.append(
                f"{len(want)} messages were still unanswered after {timeout_s:g} s without "
                "a new answer"
            )
            break
        if reader.error is not None:
            break
        time.sleep(0.05)
    ats = [o.at for o in result.outputs]
    result.elapsed_s = max([*ats, result.sent_at[-1] if result.sent_at else 0.0])


def _identify(kind: str, body: dict[str, Any], tokens_topic: str) -> tuple[str | None, str | None]:
    """``(id, key)`` of an answer; a dead letter of another topic has no id of ours."""
    if kind == "prediction":
        return body["id"], body["key"]
    if body["topic"] != tokens_topic:
        return None, None
    key = body["key"]
    return f"{body['partition']}:{body['offset']}", (
        None if key is None else key.decode("utf-8", "replace")
    )
