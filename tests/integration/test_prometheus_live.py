"""The real Prometheus server with the shipped config, scraping a live worker under load and a
scheduled retraining job: every dashboard query returns data, every alert rule evaluates.

Grafana is not installable here; evaluating each panel's expression (its Grafana variables
replaced as Grafana would, `tests/promql.py`) through Prometheus' HTTP API is its check. The
config is deploy/prometheus/prometheus.yml with the targets pointed at this test's processes
(compose's service names do not resolve here) and 1 s scrape and evaluation intervals; its
rule file is deploy/prometheus/alerts.yml as shipped.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from kafka import KafkaProducer
from promql import (
    ALERTS,
    DASHBOARD,
    PROMETHEUS_CONFIG,
    alert_expressions,
    dashboard_expressions,
    dashboard_variables,
    substitute,
)
from stream_harness import REPO, StreamTopicsFactory, WorkerFactory, make_model

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.processes import ManagedProcess, find_free_port
from stream_rnn.registry import Registry, save_checkpoint
from stream_rnn.train.data import Record, read_records, write_records
from stream_rnn.train.vocab import Vocab

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
PROMETHEUS = shutil.which("prometheus")
READY_S = 90.0
LOAD_TOKENS_PER_S = 300


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _query(base: str, expr: str) -> dict[str, Any]:
    return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")  # type: ignore[no-any-return]


def _config(tmp: Path, worker: int, retrain: int, prometheus: int) -> Path:
    """The shipped config, its targets pointed at this test's processes, 1 s intervals."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    targets = {
        "stream-rnn-worker": f"127.0.0.1:{worker}",
        "stream-rnn-retrain": f"127.0.0.1:{retrain}",
        "prometheus": f"127.0.0.1:{prometheus}",
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), "a job was added to prometheus.yml: point it here too"
    for name, job in jobs.items():
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        job["static_configs"] = [{"targets": [targets[name]]}]
    shutil.copy(ALERTS, tmp / ALERTS.name)  # rule_files are relative to the config
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _registry_with_v1(tmp: Path, data: Path) -> Path:
    """A registry whose production model is an untrained next-token GRU over ``data``."""
    records = list(read_records(data))
    vocab = Vocab.build([r.items("char") for r in records], "char")
    torch.manual_seed(0)
    cfg = ModelConfig(
        task="next-token", cell="gru", vocab_size=len(vocab), embed_dim=8, hidden_size=16
    )
    manifest = save_checkpoint(tmp / "v1", RecurrentModel(cfg).eval(), vocab=vocab.to_dict())
    registry = Registry(tmp / "registry")
    registry.add(tmp / "v1")
    registry.promote(manifest.version)
    return tmp / "registry"


class Load(threading.Thread):
    """Token events at a steady rate over 40 keys, with a malformed message now and then."""

    def __init__(self, bootstrap: str, topic: str, records: list[Record]) -> None:
        super().__init__(daemon=True)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self.topic, self.records = topic, records
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        tokens = [t for r in self.records for t in r.items("char")]
        deadline = time.monotonic() + 600  # bounded, whatever happens to the test
        while not self.stop.is_set() and time.monotonic() < deadline:
            for _ in range(LOAD_TOKENS_PER_S // 10):
                token = tokens[self.sent % len(tokens)]
                value = {"v": 1, "type": "token", "token": token, "ts": time.time()}
                key = f"user-{self.sent % 40}".encode()
                self.producer.send(self.topic, json.dumps(value).encode(), key=key)
                self.sent += 1
            if self.sent % 500 < 30:
                self.producer.send(self.topic, b"{not json", key=b"user-bad")
            self.stop.wait(0.1)
        self.producer.flush(10)
        self.producer.close(10)


def test_every_dashboard_query_and_alert_rule_against_a_live_worker(
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    worker_factory: WorkerFactory,
    tmp_path: Path,
) -> None:
    assert PROMETHEUS is not None, (
        "the prometheus server is not installed: run `make setup` (deploy/bootstrap.sh installs "
        "Debian's prometheus package)"
    )
    model_dir, data, records = make_model(tmp_path, "next-token", 40)
    topics = stream_topics(partitions=2)
    worker_metrics, retrain_metrics, prom_port = (
        find_free_port(),
        find_free_port(),
        find_free_port(),
    )
    worker = worker_factory(model_dir, *topics.worker_args(), "--metrics-port", str(worker_metrics))
    worker.wait_until(lambda s: len(s["assigned"]) == 2, "partitions assigned")
    load = Load(kafka_broker, topics.tokens, records)
    load.start()

    retrain_records = list(read_records(data)) * 2
    retrain_data = tmp_path / "retrain.jsonl"
    write_records(retrain_data, retrain_records)
    registry = _registry_with_v1(tmp_path, retrain_data)
    retrain = ManagedProcess(
        [
            sys.executable, "-m", "stream_rnn", "retrain", "--registry", str(registry),
            "--data", str(retrain_data), "--every", "1h", "--metrics-port", str(retrain_metrics),
            "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--no-announce", "--force",
        ],
        tmp_path / "retrain.log", env={"OMP_NUM_THREADS": "1"}, cwd=REPO, name="retrain",
    )  # fmt: skip
    prometheus = ManagedProcess(
        [
            PROMETHEUS,
            f"--config.file={_config(tmp_path, worker_metrics, retrain_metrics, prom_port)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log", name="prometheus",
    )  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    try:
        # the retrain job's first run publishes (--force), and Prometheus scraped it since
        retrain.wait_for(
            lambda: (registry / "retrain.jsonl").is_file(), "the first retrain run", READY_S
        )

        def scraped() -> bool:
            try:
                up = _query(base, "up")["data"]["result"]
                published = _query(base, 'stream_rnn_retrain_runs_total{decision="published"}')
            except OSError:
                return False
            healthy = {r["metric"]["job"] for r in up if r["value"][1] == "1"}
            done = [r for r in published["data"]["result"] if float(r["value"][1]) >= 1]
            return healthy >= {"stream-rnn-worker", "stream-rnn-retrain"} and bool(done)

        prometheus.wait_for(scraped, "scrapes of the worker and the retrain job", READY_S)
        # rate() over the dashboards' 1m windows needs a few samples of a moving counter
        time.sleep(8)
        assert load.sent > 1000, "the load did not run"

        variables = dashboard_variables(DASHBOARD)
        empty, broken = [], []
        for title, expr in dashboard_expressions(DASHBOARD):
            query = substitute(expr, variables)
            answer = _query(base, query)
            if answer.get("status") != "success":
                broken.append(f"{title}: {expr}: {answer}")
                continue
            # An annotation marks events ("... > 0"): it has data when one happened; what it
            # filters must have data now.
            event = re.fullmatch(r"(?s)(.*\S)\s*>\s*0", query)
            if event is not None and title.startswith("annotation:"):
                answer = _query(base, event.group(1))
            if not answer["data"]["result"]:
                empty.append(f"{title}: {expr}")
        assert not broken, "dashboard queries Prometheus refused:\n" + "\n".join(broken)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        for name, expr in alert_expressions(ALERTS):
            answer = _query(base, expr)
            assert answer.get("status") == "success", (name, expr, answer)
        # the rules themselves, as Prometheus evaluates them: every one evaluated, none failed
        deadline = time.monotonic() + 20
        while True:
            rules = [
                rule
                for group in _get(f"{base}/api/v1/rules")["data"]["groups"]
                for rule in group["rules"]
            ]
            if all(r.get("lastEvaluation", "").startswith("20") for r in rules):
                break
            assert time.monotonic() < deadline, "some rules never evaluated"
            time.sleep(1)
        assert {r["name"] for r in rules} == {name for name, _ in alert_expressions(ALERTS)}
        assert [r for r in rules if r["health"] != "ok"] == []
        # a healthy system under load: nothing critical fires
        firing = [r["name"] for r in rules if r["state"] == "firing" and
                  r["labels"].get("severity") == "critical"]  # fmt: skip
        assert firing == []

        # what was scraped agrees with the worker's own status
        status = worker.status() or {}
        tokens = _query(base, "sum(stream_rnn_tokens_total)")["data"]["result"]
        assert 0 < float(tokens[0]["value"][1]) <= status["tokens"]
        dead = _query(base, 'stream_rnn_dead_letters_total{reason="not_json"}')
        assert float(dead["data"]["result"][0]["value"][1]) >= 1
    finally:
        load.stop.set()
        load.join(30)
        prometheus.stop(20)
        retrain.stop(30)
