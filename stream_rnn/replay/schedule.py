"""The timed schedule of a replay: every message to send, when, and what it should cause.

Either recorded format becomes one list of `Scheduled` messages in send order:

* an **event log** (`stream_rnn.train.data`: one token / end / reset per line, ``ts`` in epoch
  seconds) keeps its inter-arrival times, divided by ``speed``;
* **whole sequences** (``{"key", "text" | "tokens", "label"?}``) are interleaved at random
  (``seed``; each key's order kept) and spread evenly at ``rate`` tokens per second;
* ``rate`` given for an event log re-times it evenly too; a log without any ``ts`` falls
  back to the rate.

Event logs may carry **raw lines**, messages to send byte for byte that a worker must
dead-letter (the scenario generator writes them): ``{"key": "k" | null, "raw": "<text>" |
"raw_b64": "<base64>", "ts"?, "expect"?: "<dead-letter reason>"}``. The trainer's readers do not
accept them; the replay does.

While building, the schedule follows each key the way the engine will: which sequence (and
position) every token belongs to, which sequences end, are discarded by a ``reset`` or stay
open, and which control events find no state (the engine dead-letters them as ``unknown_key``).
`SeqInfo.number` is a sequence's index among its key's sequences, as
`stream_rnn.engine.assemble.assemble` numbers them.

Example::

    schedule = build_schedule("events.jsonl", level="char", timing=Timing(speed=10.0))
    schedule.events[0].t, schedule.events[0].value   # 0.0, b'{"type":"token",...}'
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import orjson

from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.stream.codec import encode_event
from stream_rnn.stream.exceptions import Rejected
from stream_rnn.stream.messages import EndEvent, ResetEvent, TokenEvent
from stream_rnn.stream.reasons import REASONS
from stream_rnn.train.data import check_event, is_event_log, read_records, records_to_events
from stream_rnn.train.exceptions import DataError
from stream_rnn.train.vocab import Level, Token

DEFAULT_RATE = 1000.0  # tokens per second for data that carries no timing
Kind = Literal["token", "end", "reset", "raw"]
SeqState = Literal["ended", "reset", "open"]


@dataclass(frozen=True)
class Timing:
    """How fast to replay: recorded gaps / ``speed``, an even ``rate`` (tokens/s), and
    ``fast`` (send as fast as possible; the schedule's times still drive the state TTL)."""

    speed: float = 1.0
    rate: float | None = None
    fast: bool = False

    def __post_init__(self) -> None:
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ReplayError(f"--speed must be a positive number, got {self.speed}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ReplayError(f"--rate must be a positive number of tokens/s, got {self.rate}")

    def describe(self, source: str) -> str:
        if self.fast:
            return "as fast as possible (--max)"
        if self.rate is not None or source == "sequences":
            return f"{self.rate or DEFAULT_RATE:g} tokens/s"
        return f"recorded timing x{self.speed:g}"


@dataclass(slots=True)
class Scheduled:
    """One message of the replay.

    ``t``: seconds after the start at which to send it; ``value``: its wire bytes without a
    timestamp; ``expect``: the dead-letter reason it must come back with (None: a prediction,
    or nothing for tokens of a model that answers only at ``end``); ``seq``/``pos``: the
    sequence (index into `Schedule.sequences`) and position of a token, ``seq`` also for the
    control event that closes a sequence; -1 otherwise.
    """

    t: float
    kind: Kind
    key: str | None
    value: bytes
    token: Token | None = None
    label: str | None = None
    expect: str | None = None
    seq: int = -1
    pos: int = -1
    truth: dict[str, Any] | None = None  # an end's tags / target (the wire carries the label)


@dataclass(slots=True)
class SeqInfo:
    """One sequence as the engine will see it (ground truth: ``label``, ``tags``, ``target``)."""

    key: str
    number: int
    first: int  # index of its first event
    items: list[Token] = field(default_factory=list)
    label: str | None = None
    tags: list[str] | None = None
    target: list[Token] | str | None = None
    state: SeqState = "open"


@dataclass
class Schedule:
    """The messages in send order, the sequences they form, and notes about the input."""

    events: list[Scheduled]
    sequences: list[SeqInfo]
    source: Literal["events", "sequences"]
    timing: Timing
    notes: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.events[-1].t if self.events else 0.0

    @property
    def tokens(self) -> int:
        return sum(e.kind == "token" for e in self.events)

    @property
    def keys(self) -> int:
        return len({e.key for e in self.events if e.key is not None and e.expect is None})


def build_schedule(
    path: str | Path, *, level: Level, timing: Timing | None = None, seed: int = 0
) -> Schedule:
    """The replay schedule of a recorded file of either format (see the module docstring).

    ``level`` is the model vocabulary's (``char``/``word``): how whole-sequence ``text`` is
    split into tokens. Raises `ReplayError` for an unreadable or invalid file.
    """
    timing = timing or Timing()
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"--data {path}: no such file")
    try:
        if _is_event_log(path):
            source: Literal["events", "sequences"] = "events"
            rows = list(_read_event_log(path))
        else:
            source = "sequences"
            records = read_records(path)
            rows = records_to_events(records, level=level, interleave_seed=seed)
    except DataError as err:
        raise ReplayError(str(err)) from None
    if not rows:
        raise ReplayError(f"--data {path} holds no events or sequences; nothing to replay")
    notes: list[str] = []
    if source == "sequences" and timing.speed != 1.0 and timing.rate is None:
        notes.append("whole sequences carry no timing: --speed is ignored (give --rate)")
    times = _times(rows, source, timing, notes)
    events = [_scheduled(row, t) for row, t in zip(rows, times, strict=True)]
    sequences = _follow_keys(events)
    return Schedule(events, sequences, source, timing, notes)


def _is_event_log(path: Path) -> bool:
    """An event log's first line is an event (``type``) or a raw line (``raw``/``raw_b64``)."""
    with path.open("rb") as fh:
        first = next((line for line in fh if line.strip()), b"")
    try:
        obj = orjson.loads(first)
    except orjson.JSONDecodeError:
        return is_event_log(path)  # let the trainer's reader report the line
    return isinstance(obj, dict) and bool({"type", "raw", "raw_b64"} & set(obj))


def _read_event_log(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of an event log: checked events, and raw lines (``raw``/``raw_b64``)."""
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"line {n} of {path}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise ReplayError(f"{where}: not valid UTF-8 JSON ({err})") from None
            if isinstance(obj, dict) and ("raw" in obj or "raw_b64" in obj):
                yield _raw_line(obj, where)
            else:
                try:
                    yield check_event(obj, where)
                except DataError as err:
                    raise ReplayError(
                        f"{err}; a message meant to be sent as it is goes on a raw line: "
                        '{"key": ..., "raw": "<the bytes as text>", "expect": "<reason>"}'
                    ) from None


def _raw_line(obj: dict[str, Any], where: str) -> dict[str, Any]:
    key, ts, expect = obj.get("key"), obj.get("ts", 0.0), obj.get("expect")
    unknown = sorted(set(obj) - {"key", "raw", "raw_b64", "ts", "expect"})
    if unknown:
        raise ReplayError(f"{where}: raw line with unknown field(s) {unknown}")
    if key is not None and not isinstance(key, str):
        raise ReplayError(f"{where}: 'key' of a raw line must be a string or null, got {key!r:.40}")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise ReplayError(f"{where}: 'ts' must be a number (epoch seconds), got {ts!r:.40}")
    if expect is not None and expect not in REASONS:
        raise ReplayError(
            f"{where}: 'expect' {expect!r:.40} is no dead-letter reason; use one of "
            + ", ".join(REASONS)
        )
    if "raw" in obj:
        if "raw_b64" in obj or not isinstance(obj["raw"], str):
            raise ReplayError(f"{where}: give either 'raw' (a string) or 'raw_b64', not both")
        value = obj["raw"].encode("utf-8", "surrogatepass")
    else:
        try:
            value = base64.b64decode(str(obj["raw_b64"]), validate=True)
        except (binascii.Error, ValueError):
            raise ReplayError(f"{where}: 'raw_b64' is not valid base64") from None
    return {"type": "raw", "key": key, "ts": ts, "value": value, "expect": expect}


def _times(
    rows: list[dict[str, Any]], source: str, timing: Timing, notes: list[str]
) -> list[float]:
    """Send time of every row, seconds after the first: recorded gaps / speed, or a rate."""
    has_ts = source == "events" and any(float(r.get("ts") or 0.0) > 0 for r in rows)
    if timing.rate is None and has_ts:
        out: list[float] = []
        first = next(float(r["ts"]) for r in rows if float(r.get("ts") or 0.0) > 0)
        last, backwards = 0.0, 0
        for row in rows:
            ts = row.get("ts")
            t = (float(ts) - first) / timing.speed if ts else last
            if t < last:  # file order wins (it is each key's order): never send back in time
                backwards, t = backwards + 1, last
            out.append(t)
            last = t
        if backwards:
            notes.append(f"{backwards} events had a ts earlier than the event before them")
        return out
    rate = timing.rate or DEFAULT_RATE
    if source == "events" and timing.rate is None:
        notes.append(f"the event log carries no ts: replayed at {rate:g} tokens/s")
    # tokens take the slots; controls and raw messages go out with the token before them
    out, n = [], 0
    for row in rows:
        out.append(n / rate)
        n += row["type"] == "token"
    return out


def _scheduled(row: dict[str, Any], t: float) -> Scheduled:
    kind = row["type"]
    key = row.get("key")
    if kind == "raw":
        return Scheduled(t, "raw", key, row["value"], expect=row["expect"])
    if kind == "token":
        token = row["token"]
        # integer tokens of recorded data are strings on the wire (as `produce` sends them):
        # offline scoring looks them up as str(token), an integer on the wire is a token id
        struct: Any = TokenEvent(token if isinstance(token, str) else str(token))
        ev = Scheduled(t, "token", key, b"", token=token)
    elif kind == "end":
        label = row.get("label")
        struct = EndEvent(label=None if label is None else str(label))
        truth = {f: row[f] for f in ("tags", "target") if row.get(f) is not None}
        ev = Scheduled(t, "end", key, b"", label=label, truth=truth or None)
    else:
        struct = ResetEvent()
        ev = Scheduled(t, "reset", key, b"")
    try:
        ev.value = encode_event(struct)
    except Rejected as err:  # e.g. a label too long for the wire: the worker must refuse it
        ev.value, ev.expect = msgspec.json.encode(struct), err.reason
    return ev


def _follow_keys(events: list[Scheduled]) -> list[SeqInfo]:
    """Assign tokens to sequences and mark control events that will find no state."""
    sequences: list[SeqInfo] = []
    open_seq: dict[str, int] = {}  # key -> index of its open sequence (the engine has a state)
    counts: dict[str, int] = {}  # key -> sequences closed so far (assemble's numbering)
    for i, ev in enumerate(events):
        key = ev.key
        if ev.kind == "raw" or ev.expect is not None or key is None:
            continue
        s = open_seq.get(key)
        if ev.kind == "token":
            if s is None:
                s = open_seq[key] = len(sequences)
                sequences.append(SeqInfo(key, counts.get(key, 0), i))
            ev.seq, ev.pos = s, len(sequences[s].items)
            sequences[s].items.append(ev.token if ev.token is not None else "")
        elif s is None or (ev.kind == "end" and not sequences[s].items):
            ev.expect = "unknown_key"  # no state, or an end with no token since a reset
        elif ev.kind == "end":
            ev.seq = s
            seq = sequences[s]
            seq.state, seq.label = "ended", ev.label
            if ev.truth:
                seq.tags, seq.target = ev.truth.get("tags"), ev.truth.get("target")
            del open_seq[key]
            counts[key] = counts.get(key, 0) + 1
        else:  # reset: the open sequence is discarded, the key keeps a (fresh) state
            ev.seq = s
            sequences[s].state = "reset"
            counts[key] = counts.get(key, 0) + 1
            open_seq[key] = len(sequences)
            sequences.append(SeqInfo(key, counts[key], i))
    return sequences


def tokens_answered(task: str, running_estimate: bool = False) -> bool:
    """Whether a model of ``task`` answers every token (else only ``end`` and ``reset``)."""
    return task in ("next-token", "tag") or (task == "classify" and running_estimate)


def answer_expected(schedule: Schedule, tokens: bool) -> list[bool]:
    """Per message: must it be answered (a prediction or a dead letter)? Tokens only when
    ``tokens`` (see `tokens_answered`); every control event and raw message always."""
    return [tokens or ev.kind != "token" or ev.expect is not None for ev in schedule.events]
