"""Read a predictions topic back into ``stream-rnn score`` lines (``stream-rnn collect``).

The whole topic is read from the beginning with a group-less kafka-python consumer (no offsets
are committed, nothing is shared with the workers), duplicates of the at-least-once stream are
dropped by ``(id, type)``, and the predictions are assembled per ``(key, seq)`` into exactly the
line format of ``stream-rnn score``, so the two files can be compared line by line. A chunk's
prediction (``next_chunk``, ...) is expanded into its per-token predictions on the way
(`stream_rnn.engine.assemble.expand_chunk`): chunked and per-token streams give the same lines.

Example::

    lines = collect("127.0.0.1:9092", "stream-rnn.predictions", timeout_s=5, max_wait_s=120)
    write_lines("streamed.jsonl", lines)   # sorted by key, then sequence number
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream_rnn.engine.assemble import assemble
from stream_rnn.stream.codec import decode_prediction
from stream_rnn.stream.exceptions import MalformedMessage, StreamError

POLL_MS = 200
# Which prediction types reveal the task of the model that wrote them.
_TASK_OF_TYPE = {"next": "next-token", "tag": "tag", "translation": "seq2seq", "label": "classify"}
_TASK_OF_TYPE["estimate"] = "classify"

Predicate = Callable[[list[dict[str, Any]]], bool]


def read_predictions(
    bootstrap: str,
    topic: str,
    *,
    timeout_s: float = 5.0,
    max_wait_s: float = 300.0,
    until: Predicate | None = None,
    isolation: str = "read_committed",
) -> list[dict[str, Any]]:
    """Every distinct prediction on ``topic`` (first copy of each ``(id, type)``), in read order.

    Stops when no new prediction arrived for ``timeout_s`` seconds, when ``until(predictions)``
    holds (checked after each poll), or after ``max_wait_s`` seconds at the latest.
    ``isolation`` ``read_committed`` (default) reads only committed transactions: under the
    exactly-once guarantee every prediction is there once; ``read_uncommitted`` also reads
    what open or aborted transactions (a crashed or fenced worker's) wrote.
    """
    if isolation not in ("read_committed", "read_uncommitted"):
        raise ValueError(f"isolation {isolation!r}; use read_committed or read_uncommitted")
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation,
            client_id="stream-rnn-collect",
        )
    except KafkaError as err:
        raise StreamError(
            f"cannot reach Kafka at {bootstrap} ({err}); pass --bootstrap HOST:PORT"
        ) from err
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise StreamError(
                f"topic {topic!r} does not exist at {bootstrap}; check --topic (workers write "
                "to the predictions topic of their settings)"
            )
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return _drain(consumer, timeout_s, max_wait_s, until)
    finally:
        consumer.close()


def _drain(
    consumer: KafkaConsumer, timeout_s: float, max_wait_s: float, until: Predicate | None
) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    start = last_new = time.monotonic()
    while True:
        polled = consumer.poll(timeout_ms=POLL_MS, max_records=10_000)
        for records in polled.values():
            for rec in records:
                try:
                    pred = decode_prediction(rec.value)
                except MalformedMessage as err:
                    raise MalformedMessage(
                        f"{rec.topic}:{rec.partition}:{rec.offset}: {err}"
                    ) from None
                ident = (pred["id"], pred["type"])
                if ident not in seen:
                    seen.add(ident)
                    out.append(pred)
                    last_new = time.monotonic()
        now = time.monotonic()
        if until is not None and until(out):
            return out
        if now - last_new >= timeout_s or now - start >= max_wait_s:
            return out


def infer_task(predictions: list[dict[str, Any]]) -> str:
    """The model task that wrote ``predictions`` (from their types); ``next-token`` if unclear."""
    types = {p["type"] for p in predictions}
    for typ in ("next", "tag", "translation", "label", "estimate"):
        if typ in types:
            return _TASK_OF_TYPE[typ]
    return "next-token"


def to_lines(predictions: list[dict[str, Any]], task: str | None = None) -> list[dict[str, Any]]:
    """Score-format lines, one per ``(key, seq)``, sorted by key then sequence number."""
    lines = assemble(predictions, task or infer_task(predictions))
    return [lines[ks] for ks in sorted(lines)]


def collect(
    bootstrap: str,
    topic: str,
    timeout_s: float = 5.0,
    max_wait_s: float = 300.0,
    *,
    task: str | None = None,
    until: Predicate | None = None,
    isolation: str = "read_committed",
) -> list[dict[str, Any]]:
    """`read_predictions` then `to_lines`: the topic as ``stream-rnn score`` lines."""
    preds = read_predictions(
        bootstrap,
        topic,
        timeout_s=timeout_s,
        max_wait_s=max_wait_s,
        until=until,
        isolation=isolation,
    )
    return to_lines(preds, task)


def write_lines(path: str | Path, lines: list[dict[str, Any]]) -> int:
    """Write ``lines`` as JSONL; returns how many."""
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(orjson.dumps(line) + b"\n")
    return len(lines)
