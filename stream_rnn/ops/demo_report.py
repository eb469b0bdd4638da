"""The end of ``stream-rnn demo``: the replay report and the demo's own summary.

`write_demo_report` analyses the replay against the offline pass of every model version that
answered (`stream_rnn.replay.analysis`), writes ``report.md``/``report.html`` with the plots
(the swap and the faults marked) and the predictions in `score`'s line format, and returns the
facts of ``summary.json``; `loop_facts` adds what the learning loop and the fault did;
`print_summary` prints the one table a reader of the demo looks at.

Example::

    facts = write_demo_report(console, out, schedule, result, registry_loader(registry),
                              markers, title="stream-rnn demo")
    facts.update(loop_facts(outcome, result, v1_version, statuses))
    print_summary(console, facts)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

STATUS_FIELDS = (
    "pid", "model_version", "assigned", "model_swaps", "restored_keys", "rebalances",
    "dead_letters",
)  # fmt: skip


def registry_loader(registry: Any) -> Callable[[str], Any]:
    """``load(version)`` of the analysis: a registered version's model and manifest, or None."""
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.registry.exceptions import RegistryError

    cache: dict[str, Any] = {}

    def load(version: str) -> Any:
        if version not in cache:
            try:
                cache[version] = load_checkpoint(registry.path(version))
            except RegistryError:
                cache[version] = None
        return cache[version]

    return load


def write_demo_report(
    console: Console,
    out: Path,
    schedule: Any,
    result: Any,
    load: Callable[[str], Any],
    markers: list[tuple[float, str]],
    *,
    title: str,
    rate: float | None,
    history: int = 0,
) -> dict[str, Any]:
    """Analyse the replay against the offline pass of each version (``load(version)``: its
    model and manifest; ``history``: the workers' token history, for a rewarm), write
    ``out/report/`` and ``out/predictions.jsonl``, print the replay's table; the summary's
    facts."""
    from stream_rnn.replay.analysis import analyse
    from stream_rnn.replay.report import latency_stats, summary_table, write_report

    analysis = analyse(
        schedule, result, task="next-token", load=load, markers=markers, history=history
    )
    paths = write_report(out / "report", analysis, title=title)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in analysis.lines)
    console.print(summary_table(analysis))
    preds = [o for o in result.outputs if o.kind == "prediction"]
    last = max(preds, key=lambda o: o.at).body["model_version"] if preds else None
    return {
        "mode": result.mode,
        "rate": rate,
        "report": str(paths[1]),
        "report_files": [str(p) for p in paths],
        "passed": analysis.passed,
        "checks": [asdict(c) for c in analysis.checks],
        "counts": analysis.counts,
        "versions": analysis.versions,
        "last_prediction_version": last,
        "accuracy": {v: q.accuracy for v, q in analysis.quality_by_version.items()},
        "latency": latency_stats(analysis.latencies),
        "worker_latency": latency_stats(analysis.worker_latencies),
        "markers": analysis.markers,
    }


def loop_facts(
    outcome: Any, result: Any, v1: str, statuses: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The learning loop and the fault, with the latency before the first fault and whether
    every message sent after the swap was answered by v2."""
    from stream_rnn.replay.report import latency_stats

    preds = [o for o in result.outputs if o.kind == "prediction"]
    kill_at = outcome.killed["at"] if outcome.killed else math.inf
    steady = [o.at - result.sent_at[o.index] for o in preds if result.sent_at[o.index] < kill_at]
    after: list[str] = []
    if outcome.new_version and outcome.swapped:
        done = max(outcome.swapped.values())
        after = [o.body["model_version"] for o in preds if result.sent_at[o.index] > done]
    return {
        "v1_version": v1,
        "v2_version": outcome.new_version,
        "recorded": outcome.recorded,
        "retrain": outcome.retrain,
        "swapped": outcome.swapped,
        "swap_pause_s": outcome.swap_pause_s,
        "after_swap": {
            "predictions": len(after),
            "by_new_version": sum(v == outcome.new_version for v in after),
        },
        "killed": outcome.killed,
        "restarted": outcome.restarted,
        "skipped": outcome.skipped,
        "latency_before_kill": latency_stats(steady),
        "workers_at_end": {n: {k: s.get(k) for k in STATUS_FIELDS} for n, s in statuses.items()},
        "error": None if outcome.error is None else str(outcome.error),
    }


def _ms(stats: dict[str, float], *keys: str) -> str:
    return " / ".join(f"{stats[k] * 1000:.0f}" for k in keys if k in stats) + " ms"


def print_summary(console: Console, facts: dict[str, Any]) -> None:
    """The demo's table: the replay, the learning loop, the fault, latency, checks."""
    table = Table(title="stream_rnn demo", show_header=False)
    table.add_column("step", style="bold")
    table.add_column("result")
    c = facts["counts"]
    if facts["mode"] == "kafka":
        table.add_row("replay", f"{c['messages']:,} messages at {facts['rate']:g} tokens/s "
                      "through Kafka, 2 exactly-once workers")  # fmt: skip
        retrain = facts.get("retrain") or {}
        if facts.get("v2_version"):
            cand, prod = retrain.get("candidate_metrics", {}), retrain.get("production_metrics", {})
            metric = retrain.get("metric", "loss")
            first = dict((v, at) for v, at, _ in facts["versions"]).get(facts["v2_version"])
            announced = [t for t, label in facts["markers"] if label == "v2 announced"]
            voc = retrain.get("vocabulary") or {}
            table.add_row(
                "learning loop",
                f"recorded {facts['recorded']} sequences, trained v2 {facts['v2_version']} "
                f"with another vocabulary ({voc.get('v1')} -> {voc.get('v2')} tokens, "
                f"{voc.get('moved')} of {voc.get('shared')} shared with other ids; held-out "
                f"{metric} {prod.get(metric, math.nan):.3f} -> "
                f"{cand.get(metric, math.nan):.3f}); announced at "
                f"{announced[0] if announced else math.nan:.1f}s, first v2 prediction at "
                f"{first if first is not None else math.nan:.1f}s, hot-swapped by "
                f"{len(facts['swapped'])} workers (pause "
                + ", ".join(f"{p * 1000:.0f}" for p in facts["swap_pause_s"].values())
                + " ms)",
            )
        else:
            table.add_row("learning loop", f"no swap: {retrain.get('reason') or facts['skipped']}")
        acc = facts["accuracy"]
        table.add_row(
            "next-token accuracy",
            f"v1 {acc.get(facts['v1_version']) or math.nan:.3f}"
            + (f" -> v2 {acc.get(facts['v2_version']) or math.nan:.3f}" if facts["v2_version"]
               else ""),
        )  # fmt: skip
        after = facts["after_swap"]
        if after["predictions"]:
            table.add_row("after the swap", f"{after['by_new_version']:,} of "
                          f"{after['predictions']:,} predictions by v2")  # fmt: skip
        killed, restarted = facts.get("killed"), facts.get("restarted")
        if killed:
            text = (
                f"SIGKILL {killed['name']} at {killed['at']:.1f}s; its partitions "
                f"{killed['partitions']} taken over at {killed.get('took_over_at', math.nan):.1f}s"
            )
            if restarted:
                text += f"; restarted, rejoined at {restarted['rejoined_at']:.1f}s"
            table.add_row("fault", text)
        else:
            table.add_row("fault", f"none: {facts['skipped']}")
        table.add_row(
            "latency (answer seen)",
            f"before the kill p50/p95/p99 {_ms(facts['latency_before_kill'], 'p50', 'p95', 'p99')}"
            f"; whole run p50/p99/max {_ms(facts['latency'], 'p50', 'p99', 'max')}",
        )
    else:
        table.add_row("replay", f"{c['messages']:,} messages in process (no broker)")
        table.add_row("latency", f"p50/p99 {_ms(facts['latency'], 'p50', 'p99')}")
    table.add_row(
        "exactly once",
        f"{c['expected answers'] - c['unanswered']:,} of {c['expected answers']:,} messages "
        f"answered, {c['answered twice']} twice, {c['duplicates']} duplicates",
    )
    failed = [ch["name"] for ch in facts["checks"] if ch["passed"] is False]
    table.add_row(
        "guarantee checks", "all passed" if not failed else "FAILED: " + "; ".join(failed)
    )
    table.add_row("report", facts["report"])
    console.print(table)
