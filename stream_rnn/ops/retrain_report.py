"""What a retraining run leaves behind: a JSON line in the log, a Prometheus text file, a summary.

The log (``<registry>/retrain.jsonl`` by default) is append-only, one object per run, and it is
the source of truth for the metrics file: the runs counter is counted from it, so that it keeps
counting across processes (cron, ``--every`` restarts) as a Prometheus counter must. The file is
written with prometheus_client's ``write_to_textfile`` (temporary file, then rename), in the text
format that node_exporter's textfile collector reads and that can be pushed to a Pushgateway
(``curl --data-binary @retrain.prom http://pushgateway:9091/metrics/job/retrain``).

Example::

    append_log(Path("runs/registry/retrain.jsonl"), entry)
    write_metrics_file(Path("retrain.prom"), Path("runs/registry/retrain.jsonl"), entry)
    print(summary_line(entry))
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DECISIONS = ("published", "kept", "failed")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, as strict JSON needs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line with a single ``write`` on an ``O_APPEND`` descriptor
    (concurrent runs never interleave a line), then fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(entry), sort_keys=True, allow_nan=False).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of a retrain log, oldest first; unreadable lines are skipped."""
    if not path.is_file():
        return
    with path.open("rb") as fh:
        for raw in fh:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry


@dataclass
class LogSummary:
    """Runs per decision and the newest entries that carry metrics / a publication."""

    runs: Counter[str]
    last_compared: dict[str, Any] | None = None
    last_published: dict[str, Any] | None = None


def summarise_log(path: Path) -> LogSummary:
    summary = LogSummary(Counter())
    for entry in read_log(path):
        summary.runs[str(entry.get("decision"))] += 1
        if isinstance(entry.get("candidate_metrics"), dict) and entry.get("metric"):
            summary.last_compared = entry
        if entry.get("decision") == "published":
            summary.last_published = entry
    return summary


class RetrainCollector(Collector):
    """The retrain metrics of one moment: the log's summary and the run that just ended."""

    def __init__(self, summary: LogSummary, entry: dict[str, Any]) -> None:
        self.summary = summary
        self.entry = entry

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "stream_rnn_retrain_runs",
            "Retraining runs by decision (counted from the retrain log)",
            labels=["decision"],
        )
        for decision in DECISIONS:
            runs.add_metric([decision], self.summary.runs.get(decision, 0))
        yield runs
        compared = self.summary.last_compared
        if compared is not None:
            metric = str(compared["metric"])
            for side, key in (
                ("candidate", "candidate_metrics"),
                ("production", "production_metrics"),
            ):
                value = compared.get(key, {}).get(metric)
                if isinstance(value, int | float):
                    gauge = GaugeMetricFamily(
                        f"stream_rnn_retrain_last_{side}_metric",
                        f"Primary metric of the last compared {side} model on the held-out rows "
                        "(loss: lower is better; accuracy: higher)",
                        labels=["metric"],
                    )
                    gauge.add_metric([metric], float(value))
                    yield gauge
        yield _gauge(
            "stream_rnn_retrain_duration_seconds",
            "Wall-clock duration of the last retraining run",
            float(self.entry.get("duration_s") or 0.0),
        )
        yield _gauge(
            "stream_rnn_retrain_last_run_timestamp_seconds",
            "When the last retraining run started (Unix time)",
            float(self.entry.get("at") or 0.0),
        )
        if self.summary.last_published is not None:
            yield _gauge(
                "stream_rnn_retrain_last_publish_timestamp_seconds",
                "When the last run that published a model started (Unix time)",
                float(self.summary.last_published.get("at") or 0.0),
            )


class LogCollector(Collector):
    """The retrain metrics read from the log at scrape time (``retrain --metrics-port``): the
    runs by decision, and the newest run as the last one (nothing ran yet: zeros)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def collect(self) -> Iterator[Metric]:
        summary = summarise_log(self.log_path)
        last: dict[str, Any] = {}
        for last in read_log(self.log_path):  # noqa: B007 - the newest entry is wanted
            pass
        yield from RetrainCollector(summary, last).collect()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def write_metrics_file(path: Path, log_path: Path, entry: dict[str, Any]) -> None:
    """Rewrite ``path`` atomically with the metrics of ``entry`` and the log at ``log_path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    registry.register(RetrainCollector(summarise_log(log_path), entry))
    write_to_textfile(str(path), registry)


def summary_line(entry: dict[str, Any]) -> str:
    """One line for humans: the decision, the versions, the metric, the rows, the time."""
    decision = entry.get("decision")
    took = f"{float(entry.get('duration_s') or 0.0):.1f}s"
    if decision == "failed" and "candidate_metrics" not in entry:
        return f"retrain failed after {took}: {entry.get('reason')}"
    rows = entry.get("rows") or {}
    shown = f"rows train {rows.get('train')} / valid {rows.get('valid')} / holdout {rows.get('holdout')}"
    if decision == "published":
        told = "announced" if entry.get("announced") else "NOT announced"
        head = (
            f"retrain published {entry.get('version')} (parent {entry.get('production')}, "
            f"policy {entry.get('policy')}, {told})"
        )
    elif decision == "kept":
        head = f"retrain kept {entry.get('production')}"
    else:
        head = "retrain failed"
    return f"{head}: {entry.get('reason')}; {shown}; {took}"
