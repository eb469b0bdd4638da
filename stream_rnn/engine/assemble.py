"""From per-event predictions back to one line per sequence, in the ``score`` format.

Streamed (``collect``) and simulated predictions are split into sequences per key and ordered
by position, so they can be diffed line by line against ``stream-rnn score``.

A key's ``seq`` field cannot tell its sequences apart: ``end`` deletes the key's state, so
every sequence after an ``end`` is ``seq`` 0 again. Sequences are therefore told apart by the
source order of the events: a prediction's ``id`` is ``partition:offset`` of the event that
caused it, and a sequence is closed by the prediction of its ``end`` (types ``end``, ``label``,
``translation``) or ``reset``.

A chunk's prediction (``next_chunk``, ``tag_chunk``, ``estimate_chunk``: one message for several
tokens) is expanded into the per-token predictions that single-token events would have given,
so chunked and per-token streams assemble into the same lines.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from stream_rnn.engine.events import CHUNK_TYPES
from stream_rnn.engine.exceptions import EngineError

# prediction types that close their key's current sequence
CLOSING = frozenset({"end", "label", "translation", "reset"})


def assemble(
    predictions: Iterable[dict[str, Any]], task: str
) -> dict[tuple[str, int], dict[str, Any]]:
    """Group predictions into score-format lines keyed by ``(key, n)``, n = the sequence's
    index among its key's sequences (0, 1, ...).

    Duplicates (same ``id`` and ``type``) are dropped, as a reader of an at-least-once stream
    must. Per key, predictions are put in source order, ``(partition, offset)`` from their
    ``id``, and split after each ``end`` / ``label`` / ``translation`` / ``reset``; the n-th
    sequence is line ``(key, n)``. Within a sequence: next-token, every ``next`` prediction in
    ``pos`` order; tag, every ``tag``; classify, the ``label`` at ``end``; seq2seq, the
    ``translation`` at ``end``. A sequence without one (e.g. closed by a ``reset`` before any
    token) has no line, but keeps its number.

    Fallback: a key with any ``id`` that is not two integers ``partition:offset`` (hand-made
    predictions) is grouped by its ``seq`` field, ordered by ``pos``, as before sequences
    could restart at ``seq`` 0; there, sequences separated by an ``end`` merge into one line.
    """
    seen: set[tuple[str, str]] = set()
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        ident = (p["id"], p["type"])
        if ident in seen:
            continue
        seen.add(ident)
        if p["type"] in CHUNK_TYPES:
            per_key[p["key"]].extend(expand_chunk(p))
        else:
            per_key[p["key"]].append(p)
    lines: dict[tuple[str, int], dict[str, Any]] = {}
    for key, preds in per_key.items():
        for n, seq_preds in _sequences(preds):
            line = _line(key, seq_preds, task)
            if line is not None:
                lines[(key, n)] = line
    return lines


def expand_chunk(pred: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The per-token predictions of a chunk's prediction, in order (``pos`` .. ``pos_to``).

    Each carries the chunk's other fields (``id``, ``seq``, ``model_version``, ...), the
    per-token type, its position, and entry i of each per-token list field.

    >>> chunk = {"type": "tag_chunk", "id": "0:7", "pos": 3, "pos_to": 4,
    ...          "tag": ["N", "V"], "prob": [0.9, 0.8]}
    >>> [(p["type"], p["pos"], p["tag"], p["prob"]) for p in expand_chunk(chunk)]
    [('tag', 3, 'N', 0.9), ('tag', 4, 'V', 0.8)]
    """
    kind, fields = CHUNK_TYPES[pred["type"]]
    first, last = pred["pos"], pred["pos_to"]
    common = {k: v for k, v in pred.items() if k not in fields and k != "pos_to"}
    columns = [pred[name] for name in fields]
    if any(len(column) != last - first + 1 for column in columns):
        raise EngineError(
            f"chunk prediction {pred.get('id')!r} covers positions {first}..{last} but carries "
            f"{[len(c) for c in columns]} entries in {list(fields)}; its writer is broken "
            "(every per-token list needs pos_to - pos + 1 entries)"
        )
    for i, values in enumerate(zip(*columns, strict=True)):
        yield {**common, "type": kind, "pos": first + i, **dict(zip(fields, values, strict=True))}


def _source(ident: object) -> tuple[int, int] | None:
    """``(partition, offset)`` of a prediction id ``"partition:offset"``; None if it is not."""
    if not isinstance(ident, str):
        return None
    part, sep, offset = ident.partition(":")
    if not sep:
        return None
    try:
        return int(part), int(offset)
    except ValueError:
        return None


def _sequences(preds: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """One key's predictions split into ``(n, predictions of its n-th sequence)``."""
    sources: list[tuple[int, int]] = []
    for p in preds:
        source = _source(p["id"])
        if source is None:
            by_seq: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for q in preds:
                by_seq[q["seq"]].append(q)
            return sorted(by_seq.items(), key=lambda item: item[0])
        sources.append(source)
    order = sorted(range(len(preds)), key=sources.__getitem__)  # stable: ties keep input order
    out: list[tuple[int, list[dict[str, Any]]]] = []
    current: list[dict[str, Any]] = []
    for i in order:
        p = preds[i]
        current.append(p)
        if p["type"] in CLOSING:
            out.append((len(out), current))
            current = []
    if current:  # the key's open sequence (no end yet)
        out.append((len(out), current))
    return out


def _line(key: str, preds: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    if task in ("next-token", "tag"):
        kind = "next" if task == "next-token" else "tag"
        steps = sorted((p for p in preds if p["type"] == kind), key=lambda p: p["pos"])
        if not steps:
            return None
        version = steps[-1]["model_version"]
        if task == "next-token":
            return {"key": key, "model_version": version, "next": [p["next"] for p in steps]}
        return {
            "key": key,
            "model_version": version,
            "tags": [p["tag"] for p in steps],
            "tag_probs": [p["prob"] for p in steps],
        }
    final = [p for p in preds if p["type"] in ("label", "translation")]
    if not final:
        return None
    p = final[-1]
    if task == "classify":
        return {
            "key": key,
            "model_version": p["model_version"],
            "label": p["label"],
            "probs": p["probs"],
        }
    return {
        "key": key,
        "model_version": p["model_version"],
        "output": p["output"],
        "output_tokens": p["output_tokens"],
    }
