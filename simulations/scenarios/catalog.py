"""Named replay scenarios: seeded generators writing the recorded event-log format.

Every scenario is a `Scenario` (how many keys and sequences, how activity spreads over keys,
sequence lengths, timing, bursts, idle gaps, open sessions, malformed messages); `generate`
turns one into event-log rows (``{"key", "v": 1, "type": "token"|"end", "token"|"label",
"ts"}``) plus raw lines for malformed messages (``{"key", "raw" | "raw_b64", "ts",
"expect": reason}``: `stream-rnn replay` sends them byte for byte and checks that each comes
back as a dead letter with that reason). The same seed gives the same file.

The content of each sequence comes from the built-in synthetic corpus of ``task``
(`stream_rnn.train.synthetic`: an English-like grammar for next-token, four Markov "dialects"
for classify, with their labels on the ``end``), so a model trained with ``stream-rnn data
synth`` + ``train`` on that task can be scored against the recorded truth.

How the timeline is built: each key gets a Zipf-distributed share of the sequences (``zipf_s``
0: uniform); each sequence a length (lognormal, uniform or a short/long mixture) and token gaps
(exponential, mean ``token_gap_s``), optionally one idle gap in its middle (longer than a TTL:
the key is evicted and must be restored exactly); its start is drawn uniformly over
``duration_s`` or, for a ``burst_share``, inside one of ``bursts`` short windows. A key's
sequences never overlap: a start that falls inside the key's previous sequence waits for its
end, and a key with more traffic than ``duration_s`` holds types faster.

Example::

    rows = generate(SCENARIOS["zipf"], seed=1, task="next-token")
    write(Path("zipf.jsonl"), rows)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_rnn.train.synthetic import generate as synthetic

TS0 = 1_700_000_000.0  # recorded times start here (epoch seconds)
MIN_GAP_S = 1e-4


@dataclass(frozen=True)
class Scenario:
    """One workload shape; see the module docstring. Lengths: ``("lognormal", median,
    sigma)``, ``("uniform", lo, hi)`` or ``("mixture", short_lo, short_hi, long_lo, long_hi,
    long_share)``, clipped to ``[min_len, max_len]``."""

    name: str
    description: str
    keys: int = 200
    sequences: int = 400
    duration_s: float = 30.0
    zipf_s: float = 0.0
    lengths: tuple[Any, ...] = ("lognormal", 40, 0.5)
    min_len: int = 2
    max_len: int = 200
    token_gap_s: float = 0.05
    bursts: int = 0
    burst_s: float = 1.0
    burst_share: float = 0.0
    idle_share: float = 0.0
    idle_gap_s: tuple[float, float] = (8.0, 15.0)
    open_share: float = 0.0
    malformed_share: float = 0.0
    hint: str = ""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "200 keys, uniform activity, lognormal lengths (median 40)"),
        Scenario(
            "zipf",
            "5,000 keys with Zipf(1.1) activity: a few hot keys carry much of the traffic",
            keys=5000,
            sequences=2500,
            duration_s=60.0,
            zipf_s=1.1,
            lengths=("lognormal", 24, 0.6),
        ),
        Scenario(
            "lengths",
            "a mixture of short (3-12) and long (120-400 token) sequences, 25 % long",
            sequences=300,
            lengths=("mixture", 3, 12, 120, 400, 0.25),
            max_len=400,
            token_gap_s=0.02,
        ),
        Scenario(
            "bursts",
            "half of the sequences start inside three 1 s bursts",
            keys=500,
            sequences=600,
            bursts=3,
            burst_s=1.0,
            burst_share=0.5,
            lengths=("lognormal", 20, 0.4),
            token_gap_s=0.01,
        ),
        Scenario(
            "idle",
            "40 % of the sequences pause 8-15 s mid-sequence: longer than a 5 s TTL",
            keys=150,
            sequences=150,
            duration_s=60.0,
            idle_share=0.4,
            hint="replay with --ttl 5: idle keys are evicted and restored when they return",
        ),
        Scenario(
            "open",
            "30 % of the keys leave their last session open (no end)",
            open_share=0.3,
        ),
        Scenario(
            "malformed",
            "5 % of the messages are malformed, every dead-letter reason",
            malformed_share=0.05,
        ),
        Scenario(
            "mixed",
            "Zipf(1.0) keys, length mixture, two bursts, idle gaps, open sessions, 2 % malformed",
            keys=1000,
            sequences=800,
            duration_s=60.0,
            zipf_s=1.0,
            lengths=("mixture", 4, 16, 60, 160, 0.3),
            bursts=2,
            burst_s=2.0,
            burst_share=0.25,
            idle_share=0.1,
            open_share=0.1,
            malformed_share=0.02,
            hint="replay with --ttl 5 to see evictions and restores",
        ),
    )
}

# Malformed messages, one per dead-letter reason a worker gives (before the engine, plus
# unknown_key from the engine): (reason, key kind, raw value).
_BAD: tuple[tuple[str, str, bytes], ...] = (
    ("not_json", "ghost", b'{"v":1,"type":"token","token":"a"'),
    ("not_json", "ghost", b"\xff\xfe not utf-8"),
    ("not_object", "ghost", b'["a","b"]'),
    ("missing_field", "ghost", b'{"v":1,"type":"token"}'),
    ("extra_field", "ghost", b'{"v":1,"type":"token","token":"a","colour":"red"}'),
    ("wrong_type", "ghost", b'{"v":1,"type":"token","token":true}'),
    ("bad_version", "ghost", b'{"v":2,"type":"token","token":"a"}'),
    ("bad_value", "ghost", b'{"v":1,"type":"teleport"}'),
    ("token_out_of_range", "ghost", b'{"v":1,"type":"token","token":1000000000}'),
    ("oversized", "ghost", b'{"v":1,"type":"token","token":"' + b"x" * 5000 + b'"}'),
    ("missing_key", "none", b'{"v":1,"type":"token","token":"a"}'),
    ("unknown_key", "ghost", b'{"v":1,"type":"end"}'),
)


def generate(
    scenario: Scenario, *, seed: int, task: str = "next-token", **overrides: Any
) -> list[dict[str, Any]]:
    """The scenario's event-log rows in time order (``overrides``: any `Scenario` field)."""
    sc = dataclasses.replace(scenario, **overrides) if overrides else scenario
    if sc.keys < 1 or sc.sequences < 1:
        raise ValueError(
            f"a scenario needs keys >= 1 and sequences >= 1, got {sc.keys}, {sc.sequences}"
        )
    rng = np.random.default_rng(seed)
    key_of = _keys(rng, sc)
    lengths = _lengths(rng, sc)
    contents = _contents(task, lengths, seed)
    starts = _starts(rng, sc)
    rows: list[tuple[float, int, dict[str, Any]]] = []  # (time, tiebreak, row)
    per_key: dict[int, list[int]] = {}
    for i in np.argsort(starts, kind="stable"):
        per_key.setdefault(int(key_of[i]), []).append(int(i))
    idle = rng.random(sc.sequences) < sc.idle_share
    open_keys = {k for k in per_key if rng.random() < sc.open_share}
    for k, seqs in per_key.items():
        key = f"user-{k:05d}"
        for n, (i, t, steps, pause) in enumerate(_layout(rng, sc, seqs, starts, lengths, idle)):
            times = t + np.concatenate([[0.0], np.cumsum(steps[:-1])])  # the last: to `end`
            if pause:
                cut = int(rng.integers(1, len(times) - 1))
                times[cut:] += pause
            items, label = contents[i]
            for t_tok, token in zip(times, items, strict=False):
                row = {"key": key, "v": 1, "type": "token", "token": token}
                rows.append((float(t_tok), len(rows), row))
            if not (k in open_keys and n == len(seqs) - 1):
                end: dict[str, Any] = {"key": key, "v": 1, "type": "end"}
                if label is not None:
                    end["label"] = label
                rows.append((float(times[-1] + steps[-1]), len(rows), end))
    rows += _malformed(rng, sc, len(rows), max(t for t, _, _ in rows))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [{**row, "ts": round(TS0 + t, 6)} for t, _, row in rows]


def _layout(
    rng: np.random.Generator,
    sc: Scenario,
    seqs: list[int],
    starts: np.ndarray,
    lengths: np.ndarray,
    idle: np.ndarray,
) -> list[tuple[int, float, np.ndarray, float]]:
    """One key's sequences in time: ``(sequence, start, token gaps, idle pause)`` each.

    A key's sequences never overlap; a key with more traffic than fits into ``duration_s``
    types faster (its gaps squeezed), drops its longest idle pauses until they take at most
    half of ``duration_s``, and has its sequences laid back to back with random slack instead
    of at their drawn starts."""
    gaps = [np.maximum(rng.exponential(sc.token_gap_s, int(lengths[i])), MIN_GAP_S) for i in seqs]
    pauses = [
        float(rng.uniform(*sc.idle_gap_s)) if idle[i] and lengths[i] > 2 else 0.0 for i in seqs
    ]
    while sum(pauses) > 0.5 * sc.duration_s:  # a busy key has no time for all its pauses
        pauses[max(range(len(pauses)), key=pauses.__getitem__)] = 0.0
    busy = sum(float(g.sum()) for g in gaps)
    room = 0.8 * sc.duration_s - sum(pauses)
    squeeze = min(1.0, room / busy) if busy > 0 else 1.0
    gaps = [np.maximum(g * squeeze, MIN_GAP_S) for g in gaps]  # g[0]: before the next start
    spans = [float(g.sum()) + p for g, p in zip(gaps, pauses, strict=True)]
    placed, free = [], 0.0
    for i, span in zip(seqs, spans, strict=True):
        t = max(float(starts[i]), free)
        placed.append(t)
        free = t + span
    if free > sc.duration_s:  # queued past the end: back to back with random slack
        slack = max(sc.duration_s - sum(spans), 0.0)
        cuts = np.sort(rng.uniform(0.0, slack, len(seqs)))
        placed = [float(c) + sum(spans[:j]) for j, c in enumerate(cuts)]
    # the last gap of each sequence is the wait before its end
    return [
        (i, t, np.concatenate([g[1:], g[:1]]), p)
        for i, t, g, p in zip(seqs, placed, gaps, pauses, strict=True)
    ]


def _keys(rng: np.random.Generator, sc: Scenario) -> np.ndarray:
    """The key (rank) of every sequence: P(rank r) proportional to 1 / r^zipf_s."""
    weights = 1.0 / np.arange(1, sc.keys + 1) ** sc.zipf_s
    return rng.choice(sc.keys, size=sc.sequences, p=weights / weights.sum())


def _lengths(rng: np.random.Generator, sc: Scenario) -> np.ndarray:
    kind, *args = sc.lengths
    n = sc.sequences
    if kind == "lognormal":
        raw = rng.lognormal(math.log(args[0]), args[1], n)
    elif kind == "uniform":
        raw = rng.integers(args[0], args[1] + 1, n)
    elif kind == "mixture":
        long = rng.random(n) < args[4]
        raw = np.where(
            long, rng.integers(args[2], args[3] + 1, n), rng.integers(args[0], args[1] + 1, n)
        )
    else:
        raise ValueError(f"length distribution {kind!r}: use lognormal, uniform or mixture")
    return np.clip(np.rint(raw), sc.min_len, sc.max_len).astype(int)


def _contents(task: str, lengths: np.ndarray, seed: int) -> list[tuple[list[str], str | None]]:
    """Tokens (cut to each length) and label of every sequence, from the synthetic corpus."""
    longest = int(lengths.max())
    slack = 10 if task == "next-token" else 0  # next-token cuts at word boundaries
    records = synthetic(task, len(lengths), seed=seed, min_len=longest, max_len=longest + slack)
    return [
        ([str(t) for t in rec.items("char")][: int(n)], rec.label)
        for rec, n in zip(records, lengths, strict=True)
    ]


def _starts(rng: np.random.Generator, sc: Scenario) -> np.ndarray:
    starts = rng.uniform(0.0, sc.duration_s, sc.sequences)
    if sc.bursts and sc.burst_share > 0:
        windows = np.sort(rng.uniform(0.0, max(sc.duration_s - sc.burst_s, 0.0), sc.bursts))
        in_burst = rng.random(sc.sequences) < sc.burst_share
        which = rng.integers(0, sc.bursts, sc.sequences)
        starts = np.where(
            in_burst, windows[which] + rng.uniform(0, sc.burst_s, sc.sequences), starts
        )
    return starts


def burst_windows(scenario: Scenario, seed: int) -> list[tuple[float, float]]:
    """The burst windows ``generate`` draws for ``seed`` (seconds after the start)."""
    rng = np.random.default_rng(seed)
    _keys(rng, scenario)
    _lengths(rng, scenario)
    rng.uniform(0.0, scenario.duration_s, scenario.sequences)
    if not scenario.bursts:
        return []
    windows = np.sort(
        rng.uniform(0.0, max(scenario.duration_s - scenario.burst_s, 0.0), scenario.bursts)
    )
    return [(float(w), float(w) + scenario.burst_s) for w in windows]


def _malformed(
    rng: np.random.Generator, sc: Scenario, good: int, end: float
) -> list[tuple[float, int, dict[str, Any]]]:
    """``malformed_share`` of all messages: every kind of bad message, in turn, at random times."""
    if sc.malformed_share <= 0:
        return []
    count = round(sc.malformed_share * good / (1.0 - sc.malformed_share))
    out = []
    for j in range(count):
        reason, key_kind, value = _BAD[j % len(_BAD)]
        row: dict[str, Any] = {"key": None if key_kind == "none" else f"ghost-{j:05d}"}
        try:
            row["raw"] = value.decode("utf-8")
        except UnicodeDecodeError:
            row["raw_b64"] = base64.b64encode(value).decode("ascii")
        row["expect"] = reason
        out.append((float(rng.uniform(0.0, end)), good + j, row))
    return out


def write(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def describe(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a generated file holds: counts, keys, span, malformed by reason, open sessions."""
    tokens = sum(r.get("type") == "token" for r in rows)
    ends = sum(r.get("type") == "end" for r in rows)
    bad: dict[str, int] = {}
    for r in rows:
        if "expect" in r:
            bad[r["expect"]] = bad.get(r["expect"], 0) + 1
    keys = {r["key"] for r in rows if "type" in r}
    last_type: dict[str, str] = {}
    for r in rows:
        if "type" in r:
            last_type[r["key"]] = r["type"]
    return {
        "messages": len(rows),
        "tokens": tokens,
        "ends": ends,
        "keys": len(keys),
        "open sessions": sum(t == "token" for t in last_type.values()),
        "span_s": round(rows[-1]["ts"] - rows[0]["ts"], 3) if rows else 0.0,
        "malformed": dict(sorted(bad.items())),
    }
