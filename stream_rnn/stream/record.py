"""Archive the tokens topic into recorded sequences for the trainer (``stream-rnn record``).

Two halves. `Reassembler` is pure (no Kafka): it takes Kafka records in offset order per
partition, decodes them with the worker's codec (`decode_batch`, `decode_key`), keeps one open
sequence per ``(partition, key)`` — the worker's unit of state ownership — and closes it at
``end`` (``reset`` discards it, ``generate`` leaves it alone, a rejected message is counted by
reason, as the worker would dead-letter it). `record_topic` reads a bounded window of every
partition with a group-less ``read_committed`` kafka-python consumer (``assign`` + ``seek``, as
`stream_rnn.stream.collect` does; aborted transactions are never seen) and feeds it through.
`write_atomic` writes the result with the trainer's own `write_records`.

Example::

    window = resolve_window(since=None, last="2h", until=None, now=time.time())
    rec = record_topic("127.0.0.1:9092", "stream-rnn.tokens", window, task="next-token")
    write_atomic("recorded.jsonl", rec.records)   # stream-rnn train --data recorded.jsonl ...
    print("\\n".join(rec.summary()))
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol, cast

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream_rnn.stream.codec import DEFAULT_MAX_BYTES, decode_batch, decode_key
from stream_rnn.stream.collect import POLL_MS
from stream_rnn.stream.exceptions import Rejected, StreamError
from stream_rnn.stream.messages import (
    DEFAULT_MAX_CHUNK_TOKENS,
    EndEvent,
    GenerateEvent,
    ResetEvent,
    TokenEvent,
    TokensEvent,
)
from stream_rnn.train.data import Record, write_records
from stream_rnn.train.vocab import Token

Task = Literal["next-token", "classify"]
OpenPolicy = Literal["keep", "drop"]
Progress = Callable[[int, int], None]  # (offsets done, offsets in the window)

CONNECT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 30.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d*)?(?:ms|s|m|h|d|w))+")
_PART = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h|d|w)")
_EXAMPLES = "like 90s, 30m, 2h, 1d or 1h30m"


# ------------------------------------------------------------------------------ the window
def parse_duration(text: str) -> float:
    """Seconds in ``text``: numbers with units ms, s, m, h, d, w, e.g. ``90s``, ``1h30m``.

    >>> parse_duration("30m"), parse_duration("1h30m"), parse_duration("1.5d")
    (1800.0, 5400.0, 129600.0)
    """
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise StreamError(f"--last is empty; give a duration {_EXAMPLES}")
    if not _DURATION.fullmatch(compact):
        if re.fullmatch(r"\d+(?:\.\d*)?", compact):
            units = f"{compact}s, {compact}m, {compact}h or {compact}d"
            raise StreamError(f"--last {text!r} has no unit; write {units}")
        raise StreamError(
            f"--last {text!r} is not a duration; write numbers with units (ms, s, m, h, d, w), "
            + _EXAMPLES
        )
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    if seconds <= 0:
        raise StreamError(f"--last {text!r} is zero; give a positive duration, {_EXAMPLES}")
    return seconds


def parse_time(text: str, option: str = "--since") -> float:
    """Epoch seconds of an ISO 8601 time; one without a UTC offset is taken as UTC.

    >>> parse_time("2024-05-01T12:00:00Z"), parse_time("2024-05-01")
    (1714564800.0, 1714521600.0)
    """
    raw = text.strip()
    try:  # Python 3.10's fromisoformat does not read the "Z" suffix
        moment = datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1:] in "zZ" and raw else raw)
    except ValueError:
        raise StreamError(
            f"{option} {text!r} is not an ISO 8601 time; write it like 2024-05-01T12:00:00Z, "
            "2024-05-01T14:00+02:00 or 2024-05-01 (no offset means UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = moment.timestamp()
    if seconds < 0:
        raise StreamError(f"{option} {text!r} is before 1970; Kafka timestamps start there")
    return seconds


@dataclass(frozen=True)
class Window:
    """Half-open time window ``[since, until)`` in epoch milliseconds; None = open end."""

    since_ms: int | None = None
    until_ms: int | None = None

    def describe(self) -> str:
        def show(ms: int | None, default: str) -> str:
            if ms is None:
                return default
            return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")

        return (
            f"[{show(self.since_ms, 'log start')}, {show(self.until_ms, 'end offsets at start')})"
        )


def resolve_window(*, since: str | None, last: str | None, until: str | None, now: float) -> Window:
    """The window of ``--since ISO`` or ``--last DURATION`` (before ``now``) and ``--until``."""
    if since is not None and last is not None:
        raise StreamError("give --since or --last, not both (--last 2h means --since 2 hours ago)")
    start = parse_time(since, "--since") if since is not None else None
    if last is not None:
        start = max(0.0, now - parse_duration(last))
    end = parse_time(until, "--until") if until is not None else None
    if start is not None and end is not None and end <= start:
        shown = since if since is not None else f"now-{last}"
        raise StreamError(
            f"--until {until} is not after the window start ({shown}); give an --until later "
            "than --since/--last, or leave it out to read up to the end"
        )
    return Window(
        None if start is None else int(start * 1000), None if end is None else int(end * 1000)
    )


# ---------------------------------------------------------------------------- reassembly
class KafkaRecord(Protocol):
    """What the reassembly reads of a record (kafka-python's ``ConsumerRecord`` has it all)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class Fetched:
    """A record built by hand (tests, other sources): `KafkaRecord` with ``timestamp`` in ms."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0


@dataclass
class _Open:
    start: tuple[int, int, int]  # (timestamp ms, partition, offset) of the first token
    tokens: list[Token]
    cut: bool  # the key's first sequence on a partition whose window starts mid-log


@dataclass
class PartitionRange:
    """One partition's window ``[start, stop)`` and the first/last offsets actually read."""

    partition: int
    start: int
    stop: int
    first: int | None = None
    last: int | None = None
    read: int = 0


@dataclass
class Recording:
    """The recorded sequences of a window and the counts its summary reports."""

    records: list[Record]
    task: Task
    min_tokens: int
    open_policy: OpenPolicy
    events: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    malformed_examples: list[str] = field(default_factory=list)
    open_sequences: int = 0
    cut: int = 0
    too_short: int = 0
    unlabelled: int = 0
    resets: int = 0
    generates: int = 0
    split_keys: int = 0
    partitions: list[PartitionRange] = field(default_factory=list)
    topic: str = ""
    window: Window = field(default_factory=Window)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens or ()) for r in self.records)

    @property
    def keys(self) -> int:
        return len({r.key for r in self.records})

    @property
    def labels(self) -> Counter[str]:
        return Counter(r.label for r in self.records if r.label is not None)

    def summary(self) -> list[str]:
        """Human-readable lines: what was recorded, dropped, malformed, and from where."""
        counts = f"{self.tokens} tokens, {self.keys} keys"
        source = self.topic or "the topic"
        lines = [
            f"recorded {len(self.records)} sequences ({counts}) from {self.events} "
            f"events of {source}, window {self.window.describe()}, read_committed"
        ]
        for p in self.partitions:
            got = f" (offsets {p.first}..{p.last})" if p.first is not None else ""
            lines.append(
                f"  partition {p.partition}: window [{p.start}, {p.stop}), {p.read} read{got}"
            )
        labels = ", ".join(f"{k} {n}" for k, n in sorted(self.labels.items()))
        lines.append(f"labels: {labels or 'none'}")
        bad = sum(self.malformed.values())
        if bad:
            reasons = ", ".join(f"{r} {n}" for r, n in self.malformed.most_common())
            lines.append(f"malformed: {bad} ({reasons}), skipped as the worker dead-letters them")
            lines += [f"  e.g. {example}" for example in self.malformed_examples]
        else:
            lines.append("malformed: 0")
        if self.open_policy == "drop":
            fate = "dropped (--open drop)"
        elif self.task == "classify":
            fate = "unlabelled, so dropped under --task classify"
        else:
            fate = "kept (unlabelled)"
        lines.append(f"open sequences at the end of the window: {self.open_sequences}, {fate}")
        if self.cut:
            lines.append(
                f"{self.cut} sequences may have begun before the window start (a key's first "
                "sequence on a partition whose window starts mid-log); they start at their "
                "first token in the window"
            )
        dropped = [f"{self.too_short} shorter than --min-tokens {self.min_tokens}"]
        if self.task == "classify":
            dropped.append(f"{self.unlabelled} without a label (--task classify)")
            if not self.labels:
                lines.append(
                    "no sequence in the window had a label: --task classify needs `end` events "
                    "that carry one; record with --task next-token to keep the sequences"
                )
        dropped.append(f"{self.resets} discarded by reset")
        lines.append("dropped: " + ", ".join(dropped))
        if self.generates:
            lines.append(f"ignored: {self.generates} generate events (no part of a sequence)")
        if self.split_keys:
            lines.append(
                f"{self.split_keys} keys appear on more than one partition; each partition's "
                "events make sequences of their own, as in the worker"
            )
        return lines


class Reassembler:
    """Decode Kafka records and cut them into per-key sequences (sans I/O).

    Feed each partition's records in offset order (partitions may interleave), then `finish`.
    ``cut_partitions``: partitions whose window starts after their log start, so that a key's
    first sequence there may have begun before it.

    >>> from stream_rnn.stream.codec import encode_event
    >>> tok = lambda t: encode_event({"type": "token", "token": t})
    >>> r = Reassembler()
    >>> r.feed([Fetched(0, 0, b"k", tok("a")), Fetched(0, 1, b"k", tok("b")),
    ...         Fetched(0, 2, b"k", encode_event({"type": "end"}))])
    >>> r.finish().records
    [Record(key='k', tokens=['a', 'b'], text=None, label=None, target=None, tags=None)]
    """

    EXAMPLES = 5

    def __init__(
        self,
        *,
        task: Task = "next-token",
        min_tokens: int = 1,
        open_policy: OpenPolicy = "keep",
        max_bytes: int = DEFAULT_MAX_BYTES,
        cut_partitions: Iterable[int] = (),
        max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
    ) -> None:
        if task not in ("next-token", "classify"):
            raise StreamError(f"task {task!r} cannot be recorded; use next-token or classify")
        if open_policy not in ("keep", "drop"):
            raise StreamError(f"open policy {open_policy!r}; use keep or drop")
        if min_tokens < 1:
            raise StreamError(f"--min-tokens {min_tokens}: a sequence needs at least 1 token")
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens  # a `tokens` chunk's limit, as the worker's max_chunk_tokens
        self.cut_partitions = frozenset(cut_partitions)
        self._open: dict[tuple[int, str], _Open] = {}
        self._seen: set[tuple[int, str]] = set()
        self._done: list[tuple[tuple[int, int, int], Record]] = []
        self._rec = Recording([], task, min_tokens, open_policy)

    def feed(self, batch: Sequence[KafkaRecord]) -> None:
        """Apply ``batch`` (one poll's records) in order."""
        rec = self._rec
        # decode_batch turns a None value (a tombstone) into a `Rejected`, like any bad value
        values = cast("list[bytes]", [r.value for r in batch])
        rec.events += len(batch)
        decoded = decode_batch(values, max_bytes=self.max_bytes, max_tokens=self.max_tokens)
        for msg, event in zip(batch, decoded, strict=True):
            if isinstance(event, Rejected):
                self._malformed(msg, event)
                continue
            try:
                key = decode_key(msg.key)
            except Rejected as err:
                self._malformed(msg, err)
                continue
            where = (msg.partition, key)
            first_seen = where not in self._seen
            if first_seen:
                self._seen.add(where)
            if isinstance(event, TokenEvent | TokensEvent):
                seq = self._open.get(where)
                if seq is None:
                    cut = first_seen and msg.partition in self.cut_partitions
                    start = (msg.timestamp, msg.partition, msg.offset)
                    seq = self._open[where] = _Open(start, [], cut)
                if isinstance(event, TokensEvent):  # a chunk: its tokens, in order
                    seq.tokens.extend(event.tokens)
                else:
                    seq.tokens.append(event.token)
            elif isinstance(event, EndEvent):
                # an `end` may carry the sequence's label (messages.EndEvent)
                label = event.label
                self._close(self._open.pop(where, None), key, label)
            elif isinstance(event, ResetEvent):
                if self._open.pop(where, None) is not None:
                    rec.resets += 1
            elif isinstance(event, GenerateEvent):
                rec.generates += 1

    def _malformed(self, msg: KafkaRecord, err: Rejected) -> None:
        rec = self._rec
        rec.malformed[err.reason] += 1
        if len(rec.malformed_examples) < self.EXAMPLES:
            rec.malformed_examples.append(f"{msg.partition}:{msg.offset} {err}"[:200])

    def _close(self, seq: _Open | None, key: str, label: str | None) -> None:
        rec = self._rec
        if seq is None or len(seq.tokens) < rec.min_tokens:
            rec.too_short += 1  # an end with no token in the window counts here too
        elif rec.task == "classify" and label is None:
            rec.unlabelled += 1
        else:
            rec.cut += seq.cut
            self._done.append((seq.start, Record(key, seq.tokens, label=label)))

    def finish(self) -> Recording:
        """The recording: closed sequences (then kept open ones) in the order they began."""
        rec = self._rec
        rec.open_sequences = len(self._open)
        if rec.open_policy == "keep":
            for (_, key), seq in self._open.items():
                self._close(seq, key, None)
        self._open = {}
        rec.records = [r for _, r in sorted(self._done, key=lambda d: d[0])]
        by_key = Counter(key for _, key in self._seen)
        rec.split_keys = sum(n > 1 for n in by_key.values())
        return rec


def reassemble(
    records: Iterable[KafkaRecord],
    *,
    task: Task = "next-token",
    min_tokens: int = 1,
    open_policy: OpenPolicy = "keep",
    max_bytes: int = DEFAULT_MAX_BYTES,
    cut_partitions: Iterable[int] = (),
    max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
) -> Recording:
    """`Reassembler` over ``records`` in one go (each partition's records in offset order)."""
    machine = Reassembler(
        task=task,
        min_tokens=min_tokens,
        open_policy=open_policy,
        max_bytes=max_bytes,
        cut_partitions=cut_partitions,
        max_tokens=max_tokens,
    )
    machine.feed(list(records))
    return machine.finish()


# --------------------------------------------------------------------------------- Kafka
def open_consumer(
    bootstrap: str, *, client_id: str, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> KafkaConsumer:
    """A group-less, read_committed kafka-python consumer that never creates topics."""
    try:
        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            # retention may delete the window's head while it is read: go on from the new start
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            allow_auto_create_topics=False,
            bootstrap_timeout_ms=int(connect_timeout_s * 1000),
            client_id=client_id,
        )
    except KafkaError as err:
        raise StreamError(
            f"cannot reach Kafka at {bootstrap} ({err}); start a broker (stream-rnn kafka up) "
            "or pass --bootstrap HOST:PORT"
        ) from None


def topic_partitions(consumer: KafkaConsumer, bootstrap: str, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic``, or a `StreamError` naming the topics that do exist."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        known = sorted(t for t in consumer.topics() if not t.startswith("__"))
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") or "none"
        raise StreamError(
            f"topic {topic!r} does not exist at {bootstrap} (topics there: {listed}); pass "
            "--topic NAME, or set STREAM_RNN_TOKENS_TOPIC"
        )
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def _offsets_at(
    consumer: KafkaConsumer, tps: list[TopicPartition], ms: int, fallback: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    # The earliest offset whose timestamp is >= ms; a partition with none has nothing after ms.
    found = consumer.offsets_for_times(dict.fromkeys(tps, ms))
    return {tp: fallback[tp] if found.get(tp) is None else found[tp].offset for tp in tps}


def record_topic(
    bootstrap: str,
    topic: str,
    window: Window | None = None,
    *,
    task: Task = "next-token",
    min_tokens: int = 1,
    open_policy: OpenPolicy = "keep",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
    progress: Progress | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    stall_timeout_s: float = STALL_TIMEOUT_S,
) -> Recording:
    """Record the committed events of every partition of ``topic`` within ``window``.

    The window ends at ``window.until_ms`` or at the end offsets (last stable offsets, under
    read_committed) taken when reading starts, whichever comes first, so the read ends even
    while producers keep writing. ``progress(done, total)`` is called after every poll with
    the offsets passed so far. A partition that stops advancing for ``stall_timeout_s`` (the
    broker went away) raises `StreamError`.
    """
    window = window or Window()
    # Built first so that bad options fail before any connection is made.
    machine = Reassembler(
        task=task,
        min_tokens=min_tokens,
        open_policy=open_policy,
        max_bytes=max_bytes,
        max_tokens=max_tokens,
    )
    consumer = open_consumer(
        bootstrap, client_id="stream-rnn-record", connect_timeout_s=connect_timeout_s
    )
    try:
        tps = topic_partitions(consumer, bootstrap, topic)
        begin = consumer.beginning_offsets(tps)
        ranges = _plan(consumer, tps, window, begin)
        machine.cut_partitions = frozenset(
            tp.partition for tp, r in ranges.items() if begin[tp] < r.start < r.stop
        )
        _drain(consumer, ranges, machine, progress, stall_timeout_s)
    except KafkaError as err:
        raise StreamError(
            f"lost Kafka at {bootstrap} while reading {topic!r} ({err}); check the broker and "
            "run the command again (nothing was written)"
        ) from None
    finally:
        consumer.close()
    rec = machine.finish()
    rec.topic, rec.window, rec.partitions = topic, window, list(ranges.values())
    return rec


def _plan(
    consumer: KafkaConsumer,
    tps: list[TopicPartition],
    window: Window,
    begin: dict[TopicPartition, int],
) -> dict[TopicPartition, PartitionRange]:
    """Each partition's offsets ``[start, stop)``, bounded by the end offsets taken now."""
    end = consumer.end_offsets(tps)
    start = begin if window.since_ms is None else _offsets_at(consumer, tps, window.since_ms, end)
    stop = end if window.until_ms is None else _offsets_at(consumer, tps, window.until_ms, end)
    return {
        tp: PartitionRange(tp.partition, start[tp], max(start[tp], min(stop[tp], end[tp])))
        for tp in tps
    }


def _drain(
    consumer: KafkaConsumer,
    ranges: dict[TopicPartition, PartitionRange],
    machine: Reassembler,
    progress: Progress | None,
    stall_timeout_s: float,
) -> None:
    total = sum(r.stop - r.start for r in ranges.values())
    active = {tp: r for tp, r in ranges.items() if r.start < r.stop}
    passed = {tp: r.start for tp, r in active.items()}
    consumer.assign(list(active))
    for tp, r in active.items():
        consumer.seek(tp, r.start)
    moved_at = time.monotonic()
    while active:
        for tp, batch in consumer.poll(timeout_ms=POLL_MS, max_records=10_000).items():
            r = ranges[tp]
            inside = [m for m in batch if m.offset < r.stop]
            if inside:
                r.first = inside[0].offset if r.first is None else r.first
                r.last = inside[-1].offset
                r.read += len(inside)
                machine.feed(inside)
        now = time.monotonic()
        for tp in list(active):
            # The position also steps over transaction markers and aborted records.
            position = min(consumer.position(tp), active[tp].stop)
            if position > passed[tp]:
                passed[tp], moved_at = position, now
            if position >= active[tp].stop:
                consumer.pause(tp)
                del active[tp]
        if progress is not None:
            progress(sum(p - ranges[tp].start for tp, p in passed.items()), total)
        if active and now - moved_at > stall_timeout_s:
            tp, r = min(active.items(), key=lambda item: item[1].partition)
            raise StreamError(
                f"partition {tp.partition} of {tp.topic!r} made no progress for "
                f"{stall_timeout_s:.0f}s at offset {passed[tp]} (window ends at {r.stop}); "
                "check the broker (stream-rnn kafka status) and run the command again"
            )
    if progress is not None and total == 0:
        progress(0, 0)


def write_atomic(path: str | Path, records: Iterable[Record]) -> int:
    """Write ``records`` with the trainer's `write_records`, atomically: a temporary file in
    the same directory, flushed to disk, then renamed over ``path``; returns how many."""
    target = Path(path)
    if not target.parent.is_dir():
        raise StreamError(
            f"cannot write {target}: directory {target.parent} does not exist; create it or "
            "choose another --out"
        )
    if target.is_dir():
        raise StreamError(f"--out {target} is a directory; give a file name like recorded.jsonl")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        count = write_records(tmp, records)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count
