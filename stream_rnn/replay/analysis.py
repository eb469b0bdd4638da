"""From what a replay observed to the numbers and checks of its report.

* **lines**: the ``stream-rnn score`` line format (`stream_rnn.engine.assemble.assemble`, as
  ``collect`` builds it), in the order the sequences began, as ``score`` writes them;
* **quality** against the recorded ground truth: next-token accuracy (top-1 = the token that
  came next) and perplexity, label / tag accuracy (and label perplexity), translation exact
  match; overall, per model version and over time;
* **latency** of every prediction from its message's scheduled time, throughput over time;
* **guarantee checks**: every message answered exactly once, dead letters with the reasons
  the data asked for, predictions equal to the offline pass of the version that made them,
  every prediction naming its version, answers keyed like their messages.

Example::

    analysis = analyse(schedule, result, task="next-token", load=lambda v: (model, manifest))
    for check in analysis.checks:
        print(check.name, check.passed, check.detail)
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stream_rnn.engine.assemble import assemble, expand_chunk
from stream_rnn.engine.events import CHUNK_TYPES
from stream_rnn.replay.agreement import Agreement, LoadVersion, OfflinePass, SeqPredictions
from stream_rnn.replay.result import Output, ReplayResult
from stream_rnn.replay.schedule import Schedule, answer_expected, tokens_answered

CLOSING = ("end", "label", "translation", "reset")


@dataclass
class Check:
    """One guarantee check: passed (None: not applicable) and what was found."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Quality:
    """Accuracy (``correct`` of ``n``) and perplexity (``exp`` of the mean NLL) of predictions."""

    n: int = 0
    correct: int = 0
    nll_sum: float = 0.0
    nll_n: int = 0

    def add(self, correct: bool, nll: float | None) -> None:
        self.n += 1
        self.correct += correct
        if nll is not None:
            self.nll_sum += nll
            self.nll_n += 1

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll_sum / self.nll_n) if self.nll_n else None


@dataclass
class Analysis:
    """Everything the report shows; see the module docstring."""

    task: str
    mode: str
    timing: str
    counts: dict[str, int]
    lines: list[dict[str, Any]]
    quality: Quality
    quality_by_version: dict[str, Quality]
    quality_points: list[tuple[float, bool, float | None]]  # (at, correct, nll)
    latencies: list[float]
    worker_latencies: list[float]
    dead_letters: Counter[str]
    expected_dead_letters: Counter[str]
    versions: list[tuple[str, float, int]]  # (version, first seen at, predictions)
    markers: list[tuple[float, str]]
    processed: list[tuple[float, int]]  # (at, tokens) per micro-batch, in process
    answered_at: list[float]
    offered_at: list[float]  # tokens
    sent_at: list[float]  # every message
    agreement: Agreement
    pool: dict[str, int] | None
    elapsed_s: float
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)


def analyse(
    schedule: Schedule,
    result: ReplayResult,
    *,
    task: str,
    load: LoadVersion,
    running_estimate: bool = False,
    markers: list[tuple[float, str]] | None = None,
    top_k: int = 5,
    history: int = 0,
) -> Analysis:
    """Analyse a replay (see the module docstring); ``load(version)`` gives the model and
    manifest of a version for the offline check, or None; ``markers``: ``(time, label)``
    events (e.g. injected faults) to mark on the over-time plots, beside the model swaps;
    ``history``: the workers' token history (a ``rewarm`` swap recomputes states from it)."""
    events = schedule.events
    preds = [o for o in result.outputs if o.kind == "prediction"]
    dead = [o for o in result.outputs if o.kind == "dead_letter"]
    running_estimate = running_estimate or any(
        o.body["type"] in ("estimate", "estimate_chunk") for o in preds
    )
    per_seq = _per_sequence(schedule, preds)
    offline = OfflinePass(schedule, task, load, top_k, history)
    agreement = offline.compare(per_seq, _suspects(schedule, result, per_seq, preds))
    quality, by_version, points = _quality(schedule, per_seq, offline, task, preds)
    versions = _versions(preds)
    swaps = [(at, f"model {v[:14]}") for v, at, _ in versions[1:]]
    delivered = [not math.isnan(t) for t in result.sent_at]
    expected = answer_expected(schedule, tokens_answered(task, running_estimate))
    answers = Counter(o.index for o in result.outputs)
    unanswered = sum(
        1 for i, want in enumerate(expected) if want and delivered[i] and not answers[i]
    )
    twice = sum(1 for n in answers.values() if n > 1)
    expected_dead = Counter(
        ev.expect for ev, d in zip(events, delivered, strict=True) if ev.expect and d
    )
    got_dead = Counter(str(o.body["reason"]) for o in dead)
    wrong_reason = sum(1 for o in dead if events[o.index].expect != o.body["reason"])
    analysis = Analysis(
        task=task,
        mode=result.mode,
        timing=result.timing,
        counts={
            "messages": len(events),
            "sent": result.sent - result.send_failed,
            "tokens": schedule.tokens,
            "sequences": sum(1 for s in schedule.sequences if s.items),
            "keys": schedule.keys,
            "predictions": len(preds),
            "dead letters": len(dead),
            "expected answers": sum(expected),
            "unanswered": unanswered,
            "answered twice": twice,
            "duplicates": result.duplicates,
            "foreign": result.foreign,
            "send failures": result.send_failed,
        },
        lines=_lines(schedule, preds, task),
        quality=quality,
        quality_by_version=by_version,
        quality_points=points,
        latencies=[o.at - result.sent_at[o.index] for o in preds],
        worker_latencies=[
            float(o.body["latency_s"]) for o in preds if o.body.get("latency_s") is not None
        ],
        dead_letters=got_dead,
        expected_dead_letters=expected_dead,
        versions=versions,
        markers=sorted(swaps + list(markers or [])),
        processed=result.batches,
        answered_at=[o.at for o in result.outputs],
        offered_at=[t for t, ev in zip(result.sent_at, events, strict=True) if ev.kind == "token"],
        sent_at=result.sent_at,
        agreement=agreement,
        pool=result.pool,
        elapsed_s=result.elapsed_s,
        notes=[*schedule.notes, *result.notes],
    )
    analysis.checks = _checks(analysis, result, wrong_reason, preds)
    return analysis


def _per_sequence(schedule: Schedule, preds: list[Output]) -> dict[int, SeqPredictions]:
    """Each sequence's streamed predictions, found through the message that caused them."""
    events = schedule.events
    out: dict[int, SeqPredictions] = {}
    for o in preds:
        ev = events[o.index]
        if ev.seq < 0:
            continue
        entry = out.setdefault(ev.seq, SeqPredictions())
        body = o.body
        if body["type"] in CHUNK_TYPES:  # not sent by the replay, but a worker may get some
            for p in expand_chunk(body):
                entry.tokens[int(p["pos"])] = p
        elif ev.kind == "token":
            entry.tokens[ev.pos] = body
        elif body["type"] in ("label", "translation"):
            entry.final = body
    return out


def _suspects(
    schedule: Schedule,
    result: ReplayResult,
    per_seq: dict[int, SeqPredictions],
    preds: list[Output],
) -> set[int]:
    """Sequences with no per-token predictions during whose life another version served:
    their one prediction cannot tell whether their state spans a swap."""
    times: dict[str, list[float]] = {}
    for o in sorted(preds, key=lambda o: o.at):
        times.setdefault(o.body["model_version"], []).append(o.at)
    if len(times) < 2:
        return set()
    at_of = {id(o.body): o.at for o in preds}
    out = set()
    for s, entry in per_seq.items():
        if entry.tokens or entry.final is None:
            continue
        version = entry.final["model_version"]
        start = result.sent_at[schedule.sequences[s].first]
        end = at_of.get(id(entry.final), math.inf)
        for other, seen in times.items():
            i = bisect_left(seen, start)
            if other != version and i < len(seen) and seen[i] <= end:
                out.add(s)
    return out


def _quality(
    schedule: Schedule,
    per_seq: dict[int, SeqPredictions],
    offline: OfflinePass,
    task: str,
    preds: list[Output],
) -> tuple[Quality, dict[str, Quality], list[tuple[float, bool, float | None]]]:
    at_of = {id(o.body): o.at for o in preds}
    overall = Quality()
    by_version: dict[str, Quality] = {}
    points: list[tuple[float, bool, float | None]] = []
    for s, entry in per_seq.items():
        info = schedule.sequences[s]
        scored: list[tuple[dict[str, Any], bool, float | None]] = []
        if task == "next-token":
            for pos, p in entry.tokens.items():
                if p["type"] != "next" or pos + 1 >= len(info.items):
                    continue
                correct = p["next"]["tokens"][0] == str(info.items[pos + 1])
                nlls = offline.nll.get((p["model_version"], s))
                scored.append((p, correct, nlls[pos] if nlls else None))
        elif task == "tag" and info.tags:
            scored = [
                (p, p["tag"] == info.tags[pos], None)
                for pos, p in entry.tokens.items()
                if p["type"] == "tag" and pos < len(info.tags)
            ]
        elif entry.final is not None and task == "classify" and info.label is not None:
            p, truth = entry.final, str(info.label)
            prob = p["probs"].get(truth)
            nll = -math.log(max(prob, 1e-12)) if prob is not None else None
            scored = [(p, p["label"] == truth, nll)]
        elif entry.final is not None and task == "seq2seq" and info.target is not None:
            p, target = entry.final, info.target
            want = target if isinstance(target, str) else None
            same = p["output"] == want if want is not None else p["output_tokens"] == target
            scored = [(p, same, None)]
        for p, correct, nll in scored:
            overall.add(correct, nll)
            by_version.setdefault(p["model_version"], Quality()).add(correct, nll)
            points.append((at_of.get(id(p), math.nan), correct, nll))
    points = [pt for pt in points if not math.isnan(pt[0])]
    return overall, by_version, sorted(points, key=lambda pt: pt[0])


def _versions(preds: list[Output]) -> list[tuple[str, float, int]]:
    first: dict[str, float] = {}
    count: Counter[str] = Counter()
    for o in sorted(preds, key=lambda o: o.at):
        version = o.body["model_version"]
        first.setdefault(version, o.at)
        count[version] += 1
    return [(v, at, count[v]) for v, at in sorted(first.items(), key=lambda kv: kv[1])]


def _lines(schedule: Schedule, preds: list[Output], task: str) -> list[dict[str, Any]]:
    """Score-format lines of the sequences ``score`` would write, in the order they began."""
    lines = assemble((o.body for o in preds), task)
    out = []
    for info in schedule.sequences:
        if info.state == "reset" or not info.items:
            continue
        line = lines.get((info.key, info.number))
        if line is not None:
            out.append(line)
    return out


def _checks(
    analysis: Analysis, result: ReplayResult, wrong_reason: int, preds: list[Output]
) -> list[Check]:
    c = analysis.counts
    checks = [
        Check(
            "every message answered exactly once",
            c["unanswered"] == 0 and c["answered twice"] == 0 and c["duplicates"] == 0,
            f"{c['expected answers'] - c['unanswered']} of {c['expected answers']} answered; "
            f"{c['answered twice']} answered twice, {c['duplicates']} duplicate copies seen",
        ),
        Check(
            "dead letters with the reasons the data asked for",
            analysis.dead_letters == analysis.expected_dead_letters and wrong_reason == 0,
            f"{sum(analysis.dead_letters.values())} dead letters, "
            f"{sum(analysis.expected_dead_letters.values())} expected; {wrong_reason} with "
            "another reason than their message's",
        ),
    ]
    agreement = analysis.agreement
    skipped = sum(agreement.not_checked.values())
    detail = (
        f"{agreement.checked} predictions checked, {agreement.mismatched} differ; largest "
        f"probability difference {agreement.max_diff:.1e}"
    )
    if agreement.span_policies:
        spans = ", ".join(f"{p} {n}" for p, n in agreement.span_policies.items())
        detail += f"; sequences across a model swap reproduced under policy {spans}"
    if skipped:
        detail += "; not checked: " + ", ".join(
            f"{n} ({why})" for why, n in agreement.not_checked.items()
        )
    if agreement.examples:
        detail += "; e.g. " + "; ".join(agreement.examples[:2])
    checks.append(
        Check(
            "predictions equal the offline pass of their version",
            None if agreement.checked == 0 else agreement.mismatched == 0,
            detail,
        )
    )
    unnamed = sum(1 for o in preds if not o.body.get("model_version"))
    checks.append(
        Check("every prediction names its model version", unnamed == 0, f"{unnamed} without")
    )
    checks.append(
        Check(
            "answers carry their message's key",
            result.mismatched_keys == 0,
            f"{result.mismatched_keys} with another key",
        )
    )
    if result.mode == "kafka":
        checks.append(
            Check(
                "every message delivered to the tokens topic",
                result.send_failed == 0,
                f"{result.send_failed} of {c['messages']} not delivered",
            )
        )
    return checks
