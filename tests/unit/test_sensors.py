"""The sensor interface, the counting sensor's histograms and the Prometheus exposition."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_rnn.ops.processes import find_free_port
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.sensors import (
    CountingSensor,
    FanoutSensor,
    Histogram,
    LiveFigures,
    MetricsCollector,
    MetricsServer,
    Sensor,
)


def scrape(sensor: CountingSensor, live: LiveFigures, **kw: object) -> dict[str, dict]:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(sensor, lambda: live, **kw))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative() -> None:
    h = Histogram((0.01, 0.1, 1.0))
    h.observe_many([0.01, 0.010001, 0.1, 5.0])
    h.observe(0.0)
    assert h.cumulative() == [("0.01", 2), ("0.1", 4), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5
    assert h.total == pytest.approx(5.120001)
    assert h.quantile(0.5) == 0.1
    assert h.quantile(1.0) == float("inf")
    assert Histogram((1.0,)).quantile(0.5) is None
    with pytest.raises(ValueError, match="increase strictly"):
        Histogram((0.1, 0.1))


def test_metrics_follow_prometheus_conventions_and_the_sensor() -> None:
    s = CountingSensor()
    s.on_batch(4, 20, 0.01, {0: 16, 3: 4})
    s.on_step(0.004)
    s.on_predictions({"next": 3, "next_chunk": 1})
    s.on_latency([0.003, 0.02, 0.2])
    s.on_dead_letter("not_json")
    s.on_skipped(2)
    s.on_commit(0.03, 4, 10, 1000)
    s.on_commit_failure()
    s.on_rebalance([0, 3], [])
    s.on_swap(0.002)
    s.on_update_rejected("signature")
    live = LiveFigures(
        active_keys=7, state_bytes=4096, evictions=3, pool_restores=1, assigned=[0, 3],
        lag={0: 5, 3: 0}, model_version="v2",
    )  # fmt: skip
    m = scrape(s, live, dead_letter_reasons=["bad_token", "not_json"], rejection_reasons=["sha256"])
    assert m["stream_rnn_tokens_total"] == {(("partition", "0"),): 16, (("partition", "3"),): 4}
    assert m["stream_rnn_predictions_total"][(("type", "next_chunk"),)] == 1
    # every known reason has a series from the start, at 0
    assert m["stream_rnn_dead_letters_total"] == {
        (("reason", "bad_token"),): 0, (("reason", "not_json"),): 1,
    }  # fmt: skip
    assert m["stream_rnn_model_updates_rejected_total"] == {
        (("reason", "sha256"),): 0, (("reason", "signature"),): 1,
    }  # fmt: skip
    assert m["stream_rnn_latency_seconds_count"][()] == 3
    assert m["stream_rnn_latency_seconds_bucket"][(("le", "0.025"),)] == 2
    assert m["stream_rnn_latency_seconds_bucket"][(("le", "+Inf"),)] == 3
    assert m["stream_rnn_batch_tokens_sum"][()] == 20
    assert m["stream_rnn_step_seconds_count"][()] == 1
    assert m["stream_rnn_active_keys"][()] == 7
    assert m["stream_rnn_state_bytes"][()] == 4096
    assert m["stream_rnn_assigned_partitions"][()] == 2
    assert m["stream_rnn_evictions_total"][()] == 3
    assert m["stream_rnn_restores_total"][()] == 1
    assert m["stream_rnn_redeliveries_skipped_total"][()] == 2
    assert m["stream_rnn_commits_total"][()] == 1
    assert m["stream_rnn_commit_failures_total"][()] == 1
    assert m["stream_rnn_commit_seconds_count"][()] == 1
    assert m["stream_rnn_rebalances_total"][()] == 1
    assert m["stream_rnn_consumer_lag"] == {(("partition", "0"),): 5, (("partition", "3"),): 0}
    assert m["stream_rnn_model_info"] == {(("version", "v2"),): 1}
    assert m["stream_rnn_model_swaps_total"][()] == 1
    assert m["stream_rnn_swap_pause_seconds_count"][()] == 1
    # no label carries a sequence key, and every counter is a _total
    for name, series in m.items():
        assert name.startswith("stream_rnn_")
        for labels in series:
            assert {k for k, _ in labels} <= {"partition", "type", "reason", "version", "le"}


def test_a_scrape_survives_live_figures_that_fail() -> None:
    def broken() -> LiveFigures:
        raise RuntimeError("pool not built yet")

    registry = CollectorRegistry()
    registry.register(MetricsCollector(CountingSensor(), broken))
    assert b"stream_rnn_active_keys 0.0" in generate_latest(registry)


def test_fanout_reaches_every_sensor_and_the_base_is_silent() -> None:
    a, b = CountingSensor(), CountingSensor()
    fan = FanoutSensor(a, Sensor(), b)
    fan.on_dead_letter("too_large")
    fan.on_batch(1, 1, 0.0, {2: 1})
    assert a.dead_letters == b.dead_letters == {"too_large": 1}
    assert a.tokens_by_partition == {2: 1}


def test_metrics_server_serves_and_names_a_taken_port() -> None:
    port = find_free_port()
    registry = CollectorRegistry()
    sensor = CountingSensor()
    sensor.on_dead_letter("not_json")
    registry.register(MetricsCollector(sensor, LiveFigures))
    server = MetricsServer(registry, port=port)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
            body = resp.read().decode()
        assert 'stream_rnn_dead_letters_total{reason="not_json"} 1.0' in body
        with pytest.raises(StreamError, match="--metrics-port"):
            MetricsServer(registry, port=port).start()
    finally:
        server.stop()
