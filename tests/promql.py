"""PromQL of the deployment files: the metric catalogue, the expressions, Grafana's variables.

The one list of the metrics stream_rnn exposes is `METRICS` (name, kind, labels); the alert
rules (deploy/prometheus/alerts.yml) and the dashboard (deploy/grafana/dashboards/) may use
these and nothing else, which tests/unit/test_prometheus_rules.py checks. A live test sends
the same expressions to a real Prometheus::

    for title, expr in dashboard_expressions(DASHBOARD):
        query = substitute(expr, dashboard_variables(DASHBOARD))
        requests.get(f"{prometheus}/api/v1/query", params={"query": query})

Grafana replaces ``$__rate_interval`` and friends before a query leaves it; `substitute` does
the same with fixed values (`GRAFANA_DEFAULTS`), so that an expression is plain PromQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "tests" / "alerts_test.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "stream-rnn.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One metric as Prometheus stores it: ``name`` is the full name (``…_total`` for a
    counter), ``labels`` the labels the process sets (job and instance come from the scrape)."""

    name: str
    kind: Kind
    labels: tuple[str, ...] = ()
    job: str = "stream-rnn-worker"

    def series_names(self) -> tuple[str, ...]:
        """The names under which the samples arrive (a histogram is three series)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_RETRAIN = "stream-rnn-retrain"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        # worker: throughput
        Metric("stream_rnn_tokens_total", "counter", ("partition",)),
        Metric("stream_rnn_predictions_total", "counter", ("type",)),
        Metric("stream_rnn_dead_letters_total", "counter", ("reason",)),
        Metric("stream_rnn_latency_seconds", "histogram"),
        Metric("stream_rnn_batch_tokens", "histogram"),
        Metric("stream_rnn_step_seconds", "histogram"),
        # worker: keys and state
        Metric("stream_rnn_active_keys", "gauge"),
        Metric("stream_rnn_state_bytes", "gauge"),
        Metric("stream_rnn_assigned_partitions", "gauge"),
        Metric("stream_rnn_evictions_total", "counter"),
        Metric("stream_rnn_restores_total", "counter"),
        Metric("stream_rnn_redeliveries_skipped_total", "counter"),
        # worker: commits and the consumer group
        Metric("stream_rnn_commits_total", "counter"),
        Metric("stream_rnn_commit_failures_total", "counter"),
        Metric("stream_rnn_commit_seconds", "histogram"),
        Metric("stream_rnn_rebalances_total", "counter"),
        Metric("stream_rnn_consumer_lag", "gauge", ("partition",)),
        # worker: model
        Metric("stream_rnn_model_info", "gauge", ("version",)),
        Metric("stream_rnn_model_swaps_total", "counter"),
        Metric("stream_rnn_model_updates_rejected_total", "counter", ("reason",)),
        Metric("stream_rnn_model_startup_refusals_total", "counter", ("reason",)),
        Metric("stream_rnn_swap_pause_seconds", "histogram"),
        # retraining job (stream_rnn/ops/retrain_report.py)
        Metric("stream_rnn_retrain_runs_total", "counter", ("decision",), _RETRAIN),
        Metric("stream_rnn_retrain_last_candidate_metric", "gauge", ("metric",), _RETRAIN),
        Metric("stream_rnn_retrain_last_production_metric", "gauge", ("metric",), _RETRAIN),
        Metric("stream_rnn_retrain_duration_seconds", "gauge", (), _RETRAIN),
        Metric("stream_rnn_retrain_last_run_timestamp_seconds", "gauge", (), _RETRAIN),
        Metric("stream_rnn_retrain_last_publish_timestamp_seconds", "gauge", (), _RETRAIN),
    )
}

# Series Prometheus makes itself: the scrape health of every target, and the alerts' state.
BUILTIN_SERIES: dict[str, tuple[str, ...]] = {
    "up": (),
    "ALERTS": ("alertname", "alertstate", "severity"),
}
TARGET_LABELS = ("job", "instance")

SERIES_NAMES: frozenset[str] = frozenset(
    {name for m in METRICS.values() for name in m.series_names()} | set(BUILTIN_SERIES)
)
LABEL_NAMES: frozenset[str] = frozenset(
    {label for m in METRICS.values() for label in m.labels}
    | {label for labels in BUILTIN_SERIES.values() for label in labels}
    | set(TARGET_LABELS)
    | {"le"}  # histogram buckets
)

# What Grafana would put in place of its global variables (a 1 h range at a 15 s interval).
GRAFANA_DEFAULTS: dict[str, str] = {
    "__rate_interval": "1m",
    "__rate_interval_ms": "60000",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# $name, ${name}, ${name:format}, [[name]]; a name starts with a letter or "_", so the "$1" of
# a label_replace() replacement is not a variable.
_VARIABLE = re.compile(
    r"\$\{(?P<braced>[A-Za-z_]\w*)(?::[^}]*)?\}"
    r"|\[\[(?P<bracketed>[A-Za-z_]\w*)(?::[^\]]*)?\]\]"
    r"|\$(?P<plain>[A-Za-z_]\w*)"
)


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: `GRAFANA_DEFAULTS`, then ``variables``
    (a dashboard's own, e.g. ``dashboard_variables(path)``), which win.

    Raises ValueError naming a variable that neither defines, so that a query never reaches
    Prometheus with a ``$`` in it.

    >>> substitute('rate(x{instance=~"$instance"}[$__rate_interval])', {"instance": ".*"})
    'rate(x{instance=~".*"}[1m])'
    """
    values = {**GRAFANA_DEFAULTS, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        if name not in values:
            raise ValueError(
                f"Grafana variable ${name} in {expr!r} has no value; pass it in variables "
                f"(known: {', '.join(sorted(values))})"
            )
        return values[name]

    return _VARIABLE.sub(replace, expr)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        dashboard: dict[str, Any] = json.load(fh)
    return dashboard


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside a collapsed row (Grafana stores an
    expanded row's panels after it at the top level, a collapsed row's inside it)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus target of every panel, nested ones included,
    then ("annotation: <name>", expr) for each annotation query; Grafana variables unreplaced."""
    dashboard = load_dashboard(path)
    found = [
        (str(panel.get("title", "")), str(target["expr"]))
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    found += [
        (f"annotation: {annotation.get('name', '')}", str(annotation["expr"]))
        for annotation in dashboard.get("annotations", {}).get("list", [])
        if annotation.get("expr")
    ]
    return found


def dashboard_variables(path: Path = DASHBOARD) -> dict[str, str]:
    """The dashboard's template variables at "All" (their ``allValue``, else ``.*``)."""
    variables = load_dashboard(path).get("templating", {}).get("list", [])
    return {str(v["name"]): str(v.get("allValue") or ".*") for v in variables}


def load_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """Every rule of every group of a Prometheus rule file."""
    with path.open(encoding="utf-8") as fh:
        document = yaml.safe_load(fh)
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert name, expr) for every alerting rule of a Prometheus rule file."""
    return [(str(rule["alert"]), str(rule["expr"])) for rule in load_rules(path) if "alert" in rule]


# --- a small reading of PromQL, enough to list the names an expression uses ----------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# a name not preceded by a word character or a dot (so not the "m" of "5m", nor the "e" of
# "1e-9"), and whether a parenthesis follows (then it is a function)
_NAME = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "atan2", "inf", "nan"}
    # aggregation operators: `sum by (le) (…)` puts a keyword, not a parenthesis, after them
    | {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)


def _plain(expr: str) -> str:
    """``expr`` with its strings emptied and every variable replaced by a default or ``0``
    (a variable of the dashboard's own sits in a string or a range, both dropped anyway)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        return GRAFANA_DEFAULTS.get(name, "0")

    return _STRING.sub('""', _VARIABLE.sub(replace, expr))


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (functions, keywords, label names, strings and
    durations left out). Works on raw Grafana expressions too: variables are replaced first."""
    text = _plain(expr)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub(r"\1", text)
    text = _RANGE.sub("", text)
    return {
        match.group(1)
        for match in _NAME.finditer(text)
        if match.group(2) is None and match.group(1).lower() not in _KEYWORDS
    }


def label_names(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    text = _plain(expr)
    names = {label for block in _MATCHERS.findall(text) for label in _MATCHER_LABEL.findall(block)}
    for _, listed in _GROUPING.findall(text):
        names |= {label.strip() for label in listed.split(",") if label.strip()}
    return names
