"""From per-event predictions back to one line per sequence, in the ``score`` format.

Streamed (``collect``) and simulated predictions are grouped by ``(key, seq)`` and ordered by
``pos``, so they can be diffed line by line against ``stream-rnn score``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def assemble(
    predictions: Iterable[dict[str, Any]], task: str
) -> dict[tuple[str, int], dict[str, Any]]:
    """Group predictions into score-format lines keyed by ``(key, seq)``.

    next-token: every ``next`` prediction of the sequence in ``pos`` order; tag: every ``tag``;
    classify: the ``label`` at ``end``; seq2seq: the ``translation`` at ``end``. Duplicates
    (same ``id`` and ``type``) are dropped, as a reader of an at-least-once stream must.
    """
    seen: set[tuple[str, str]] = set()
    per_seq: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        ident = (p["id"], p["type"])
        if ident in seen:
            continue
        seen.add(ident)
        per_seq[(p["key"], p["seq"])].append(p)
    lines: dict[tuple[str, int], dict[str, Any]] = {}
    for (key, seq), preds in per_seq.items():
        line = _line(key, preds, task)
        if line is not None:
            lines[(key, seq)] = line
    return lines


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
