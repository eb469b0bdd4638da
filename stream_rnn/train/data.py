"""Recorded sequences on disk: whole-sequence JSONL and event-log JSONL.

Whole-sequence: one record per line, ``{"key": "k1", "tokens": [...]}`` or
``{"key": "k1", "text": "...", "label": "spam"}``, optional ``target`` and ``tags``.
Event log: one Kafka token message per line plus its key, ``{"key": "k1", "v": 1, "type":
"token", "token": "a"}``, closed by ``{"key": "k1", "v": 1, "type": "end", "label": ...}``;
``reset`` discards a key's open sequence. `read_records` tells the two apart by the first
object's ``type`` field.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from stream_rnn.train.exceptions import DataError
from stream_rnn.train.vocab import Level, Token, split_text

Incomplete = Literal["keep", "drop", "error"]
RECORD_FIELDS = ("key", "tokens", "text", "label", "target", "tags")
EVENT_FIELDS: dict[str, frozenset[str]] = {
    "token": frozenset({"key", "v", "type", "token", "ts"}),
    "end": frozenset({"key", "v", "type", "ts", "label", "target", "tags"}),
    "reset": frozenset({"key", "v", "type", "ts"}),
}
_TS0 = 1_700_000_000.0  # synthetic timestamps start here: a plausible epoch, not 0


def _is_token(t: object) -> bool:
    # bool is an int subclass, but JSON true is no token; orjson only writes 64-bit integers.
    if isinstance(t, str):
        return True
    return isinstance(t, int) and not isinstance(t, bool) and -(2**63) <= t < 2**64


def _tokens_problem(name: str, value: object) -> str | None:
    if not isinstance(value, list):
        return f"{name!r} must be a list of strings or integers, got {type(value).__name__}"
    for i, t in enumerate(value):
        if not _is_token(t):
            return f"{name!r}[{i}] must be a string or a 64-bit integer, got {t!r:.40}"
    return None


def _extras_problem(
    label: object, target: object, tags: object, n_tokens: int | None
) -> str | None:
    if label is not None and not isinstance(label, str):
        return f"'label' must be a string, got {type(label).__name__} {label!r:.40}; write it as a JSON string"
    if target is not None and not isinstance(target, str):
        problem = _tokens_problem("target", target)
        if problem:
            return problem.replace("a list", "a string or a list", 1)
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
            return f"'tags' must be a list of strings, got {tags!r:.60}"
        if n_tokens is not None and len(tags) != n_tokens:
            return f"'tags' has {len(tags)} entries but there are {n_tokens} tokens; give one per token"
    return None


@dataclass
class Record:
    """One recorded sequence: ``tokens`` or ``text``, optionally a label, target or tags.

    >>> r = Record("k1", text="ab c", label="x")
    >>> r.items("char"), r.items("word")
    (['a', 'b', ' ', 'c'], ['ab', 'c'])
    """

    key: str
    tokens: list[Token] | None = None
    text: str | None = None
    label: str | None = None
    target: list[Token] | str | None = None
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise DataError(f"record {self.key!r}: {problem}")

    def problem(self) -> str | None:
        """What is wrong with this record, or None (re-checks fields mutated after creation)."""
        if not isinstance(self.key, str) or not self.key:
            return f"'key' must be a non-empty string, got {self.key!r:.40}"
        if (self.tokens is None) == (self.text is None):
            return "give exactly one of 'tokens' (a list) and 'text' (a string)"
        if self.tokens is not None:
            problem = _tokens_problem("tokens", self.tokens)
            if problem:
                return problem
        elif not isinstance(self.text, str):
            return f"'text' must be a string, got {type(self.text).__name__}"
        n = None if self.tokens is None else len(self.tokens)
        return _extras_problem(self.label, self.target, self.tags, n)

    def items(self, level: Level) -> list[Token]:
        """The input tokens: ``tokens`` as given, or ``text`` split by ``level``."""
        if self.tokens is not None:
            return list(self.tokens)
        return [*split_text(self.text or "", level)]

    def target_items(self, level: Level) -> list[Token]:
        """The output tokens of a seq2seq record (a str target is split by ``level``)."""
        if self.target is None:
            raise DataError(f"record {self.key!r} has no 'target'; seq2seq data needs one")
        if isinstance(self.target, str):
            return [*split_text(self.target, level)]
        return list(self.target)

    def to_json(self) -> dict[str, Any]:
        """The JSONL object of this record; None fields are left out."""
        return {f: getattr(self, f) for f in RECORD_FIELDS if getattr(self, f) is not None}


def _record_from_obj(obj: object, where: str, default_key: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(RECORD_FIELDS))
    if unknown:
        raise DataError(
            f"{where}: unknown field(s) {unknown}; a record may have {', '.join(RECORD_FIELDS)}"
        )
    try:
        return Record(**{"key": default_key, **obj})
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def check_event(obj: object, where: str) -> dict[str, Any]:
    """Return ``obj`` if it is a valid event, else raise `DataError` prefixed with ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    typ = obj.get("type")
    if typ not in EVENT_FIELDS:
        raise DataError(
            f"{where}: 'type' must be 'token', 'end' or 'reset', got {typ!r:.40}; "
            "every line of an event log is one event"
        )
    unknown = sorted(set(obj) - EVENT_FIELDS[typ])
    key, v, ts = obj.get("key"), obj.get("v", 1), obj.get("ts", 0.0)
    if unknown:
        problem = f"field(s) {unknown} not allowed on a {typ!r} event; allowed: {sorted(EVENT_FIELDS[typ])}"
    elif not isinstance(key, str) or not key:
        problem = f"'key' must be a non-empty string, got {key!r:.40}"
    elif v != 1 or isinstance(v, bool):
        problem = f"unsupported message version 'v'={v!r:.20}; this reader understands v=1"
    elif not isinstance(ts, int | float) or isinstance(ts, bool):
        problem = f"'ts' must be a number (seconds since the epoch), got {ts!r:.40}"
    elif typ == "token" and "token" not in obj:
        problem = "a 'token' event needs a 'token' field"
    elif typ == "token" and not _is_token(obj["token"]):
        problem = f"'token' must be a string or a 64-bit integer, got {obj['token']!r:.40}"
    elif typ == "token":
        problem = None
    else:
        problem = _extras_problem(obj.get("label"), obj.get("target"), obj.get("tags"), None)
    if problem:
        raise DataError(f"{where}: {problem}")
    return obj


def _assemble(
    events: Iterable[tuple[dict[str, Any], str]], incomplete: Incomplete, source: str
) -> Iterator[tuple[int, Record]]:
    """Yield (index of the sequence's first event, record) as each sequence ends."""
    if incomplete not in ("keep", "drop", "error"):
        raise DataError(f"incomplete must be 'keep', 'drop' or 'error', got {incomplete!r}")
    open_: dict[str, tuple[int, list[Token]]] = {}
    for n, (ev, where) in enumerate(events):
        key, typ = ev["key"], ev["type"]
        if typ == "token":
            open_.setdefault(key, (n, []))[1].append(ev["token"])
        elif typ == "reset":
            open_.pop(key, None)
        else:
            start, tokens = open_.pop(key, (n, []))
            try:
                rec = Record(key, tokens, None, ev.get("label"), ev.get("target"), ev.get("tags"))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            yield start, rec
    if open_ and incomplete == "error":
        raise DataError(
            f"{source}: {len(open_)} sequence(s) have no 'end' event (keys {sorted(open_)[:5]}); "
            "append an 'end' per key, or read with incomplete='keep' or 'drop'"
        )
    if incomplete == "keep":
        for key, (start, tokens) in sorted(open_.items(), key=lambda kv: kv[1][0]):
            yield start, Record(key, tokens)


def events_to_records(
    events: Iterable[Mapping[str, Any]], *, incomplete: Incomplete = "keep"
) -> list[Record]:
    """Assemble validated events into records, in the order their sequences began.

    Sequences still open at the end are kept as unlabelled records, dropped, or an error.
    """
    checked = ((check_event(e, f"event {i}"), f"event {i}") for i, e in enumerate(events, 1))
    return [r for _, r in sorted(_assemble(checked, incomplete, "events"), key=lambda p: p[0])]


def records_to_events(
    records: Iterable[Record],
    *,
    level: Level = "char",
    interleave_seed: int | None = None,
    with_ts: bool = False,
) -> list[dict[str, Any]]:
    """Token events then an ``end`` (carrying label/target/tags) for each record.

    ``text`` is split by ``level``. With ``interleave_seed`` the sequences are randomly merged,
    keeping each key's order and the order in which sequences begin, so `events_to_records`
    gives the records back.
    """
    seqs: list[tuple[str, list[dict[str, Any]]]] = []
    for rec in records:
        evs: list[dict[str, Any]] = [
            {"key": rec.key, "v": 1, "type": "token", "token": t} for t in rec.items(level)
        ]
        end: dict[str, Any] = {"key": rec.key, "v": 1, "type": "end"}
        end.update(
            {f: getattr(rec, f) for f in ("label", "target", "tags") if getattr(rec, f) is not None}
        )
        seqs.append((rec.key, [*evs, end]))
    if interleave_seed is None:
        out = [e for _, evs in seqs for e in evs]
    else:
        out = _interleave(seqs, random.Random(interleave_seed))  # noqa: S311 - shuffling, not secrets
    if with_ts:
        out = [{**e, "ts": round(_TS0 + i * 0.001, 3)} for i, e in enumerate(out)]
    return out


def _interleave(
    seqs: list[tuple[str, list[dict[str, Any]]]], rng: random.Random
) -> list[dict[str, Any]]:
    # Candidates are the open sequences plus the next unstarted one, so sequences start in their
    # original order; a key's next sequence waits until its previous one has ended.
    out: list[dict[str, Any]] = []
    active: list[int] = []
    pos = [0] * len(seqs)
    busy: set[str] = set()
    nxt = 0
    while active or nxt < len(seqs):
        can_start = nxt < len(seqs) and seqs[nxt][0] not in busy
        pick = rng.randrange(len(active) + can_start)
        if pick == len(active):
            active.append(nxt)
            busy.add(seqs[nxt][0])
            nxt += 1
        i = active[pick]
        out.append(seqs[i][1][pos[i]])
        pos[i] += 1
        if pos[i] == len(seqs[i][1]):
            active.pop(pick)
            busy.discard(seqs[i][0])
    return out


def _iter_json_lines(path: str | Path) -> Generator[tuple[object, str, int], None, None]:
    # Binary mode: split on b"\n" only (text mode would also split on U+2028 inside strings).
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {n} of {path}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DataError(
                    f"{where}: not valid UTF-8 JSON ({e}); put one object per line"
                ) from None
            yield obj, where, n


def is_event_log(path: str | Path) -> bool:
    """True if the first non-empty line of ``path`` is an object with a ``type`` field."""
    with closing(_iter_json_lines(path)) as lines:
        first = next(lines, None)
    return first is not None and isinstance(first[0], dict) and "type" in first[0]


def iter_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Validated events of an event-log file, in file order."""
    for obj, where, _ in _iter_json_lines(path):
        yield check_event(obj, where)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_events(path))


def write_events(path: str | Path, events: Iterable[Mapping[str, Any]]) -> int:
    """Write validated events as JSONL; returns how many were written."""
    return _write_lines(path, (check_event(e, f"event {i}") for i, e in enumerate(events, 1)))


def iter_records(path: str | Path, *, incomplete: Incomplete = "keep") -> Iterator[Record]:
    """Stream records from either format; event-log records come as their sequences end."""
    if is_event_log(path):
        checked = ((check_event(o, w), w) for o, w, _ in _iter_json_lines(path))
        for _, rec in _assemble(checked, incomplete, str(path)):
            yield rec
    else:
        stem = Path(path).stem
        for obj, where, n in _iter_json_lines(path):
            yield _record_from_obj(obj, where, f"{stem}-{n}")


def read_records(path: str | Path, *, incomplete: Incomplete = "keep") -> list[Record]:
    """All records of a file of either format, in the order their sequences began."""
    if not is_event_log(path):
        return list(iter_records(path))
    checked = ((check_event(o, w), w) for o, w, _ in _iter_json_lines(path))
    return [r for _, r in sorted(_assemble(checked, incomplete, str(path)), key=lambda p: p[0])]


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Write whole-sequence JSONL; returns how many records were written."""

    def objs() -> Iterator[dict[str, Any]]:
        for rec in records:
            problem = rec.problem()
            if problem:
                raise DataError(f"record {rec.key!r}: {problem}")
            yield rec.to_json()

    return _write_lines(path, objs())


def _write_lines(path: str | Path, objs: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    with open(path, "wb") as f:
        for obj in objs:
            try:
                f.write(orjson.dumps(obj) + b"\n")
            except orjson.JSONEncodeError as e:
                raise DataError(f"cannot write {str(obj)[:80]} to {path} as JSON: {e}") from None
            n += 1
    return n
