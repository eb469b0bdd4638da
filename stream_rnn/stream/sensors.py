"""What a worker reports: one sensor interface, counted in memory, exposed to Prometheus.

The engine's adapter, the commit protocol, the durable store and the model follower report to a
`Sensor` (every hook a no-op by default). `CountingSensor` keeps the numbers in memory: plain
integers and `Histogram` bucket counts, cheap enough for the hot path (a micro-batch reports
once, with its per-token latencies in bulk). The status endpoint, the worker's log line and
`MetricsCollector` read the same object, so ``/metrics`` and ``GET /`` never disagree.
`FanoutSensor` hands every report to several sensors (another sensor plugs in there).

`MetricsCollector` is a prometheus-client collector: at scrape time it turns a
`CountingSensor` and the worker's live figures (`LiveFigures`: resident keys, state bytes,
consumer lag, the served model) into metric families named by Prometheus' conventions (base
units, ``_total`` counters, ``_seconds``, no sequence key in any label). `serve_metrics`
serves a registry on ``/metrics`` from a daemon thread.

Example::

    sensor = CountingSensor()
    sensor.on_batch(3, 3, 0.002, {0: 2, 1: 1})
    registry = CollectorRegistry()
    registry.register(MetricsCollector(sensor, live=lambda: LiveFigures()))
    generate_latest(registry)   # b'...stream_rnn_tokens_total{partition="0"} 2.0...'
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from stream_rnn.stream.exceptions import StreamError

log = logging.getLogger("stream_rnn.metrics")

# Bucket bounds (upper, inclusive) of the histograms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 16384)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)


class Histogram:
    """Bucket counts, sum and count of observations (Prometheus' cumulative ``le`` buckets
    at exposition). Observing is a ``bisect`` and an increment; no lock: a scrape that races an
    update reads counts at most one batch apart, and ``+Inf`` and ``_count`` are computed from
    the same bucket counts, so they always agree.

    >>> h = Histogram((0.01, 0.1)); h.observe_many([0.005, 0.01, 0.5]); h.cumulative()
    [('0.01', 2), ('0.1', 2), ('+Inf', 3)]
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: Iterable[float]) -> None:
        values = list(values)
        counts = self.counts
        for i in map(partial(bisect_left, self.bounds), values):
            counts[i] += 1
        self.total += sum(values)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket that holds quantile ``q`` (None: no observations)."""
        total = self.count
        if not total:
            return None
        rank, running = q * total, 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            if running >= rank:
                return bound
        return float("inf")


def _le(bound: float) -> str:
    return repr(float(bound)) if bound != int(bound) else f"{bound:.1f}"


class Sensor:
    """The hooks of a worker's stream path; every one a no-op here (override what you need).

    Hooks run on the thread that did the work (the engine's executor for a batch, the event
    loop for commits and swaps); keep them cheap and never raise.
    """

    def on_batch(
        self, n_events: int, n_tokens: int, seconds: float, by_partition: Mapping[int, int]
    ) -> None:
        """A micro-batch of ``n_events`` messages (``n_tokens`` tokens, per source partition in
        ``by_partition``) was decoded, stepped and encoded in ``seconds``."""

    def on_step(self, seconds: float) -> None:
        """The network pass of one micro-batch (`Engine.process`) took ``seconds``."""

    def on_predictions(self, by_type: Mapping[str, int]) -> None:
        """Predictions were encoded, counted by their wire ``type``."""

    def on_latency(self, seconds: Sequence[float]) -> None:
        """Producer timestamp -> prediction handed to the producer, one value per prediction
        whose event carried a ``ts``."""

    def on_dead_letter(self, reason: str) -> None:
        """One message was dead-lettered with ``reason``."""

    def on_skipped(self, n: int) -> None:
        """``n`` redelivered tokens were already in their keys' states (not applied again)."""

    def on_commit(self, seconds: float, transactions: int, records: int, size: int) -> None:
        """A commit round succeeded (exactly-once: ``transactions`` transactions)."""

    def on_commit_failure(self) -> None:
        """A commit round failed (the worker retries, or exits under exactly-once)."""

    def on_checkpoint(self, records: int, size: int, seconds: float) -> None:
        """An at-least-once state checkpoint was written."""

    def on_restore(self, keys: int, seconds: float) -> None:
        """A partition's states were restored from the state topic."""

    def on_rebalance(self, assigned: Sequence[int], revoked: Sequence[int]) -> None:
        """Partitions were assigned or revoked."""

    def on_swap(self, pause_seconds: float) -> None:
        """A new model version serves from now on; micro-batches paused ``pause_seconds``."""

    def on_update_rejected(self, reason: str) -> None:
        """An announced model update was refused (``reason``: signature, sha256, shape...)."""

    def on_startup_refusal(self, reason: str) -> None:
        """At start-up the announced version was refused; an older one that verifies serves."""


@dataclass
class CountingSensor(Sensor):
    """Every report counted in memory (status endpoint, log line, Prometheus, tests).

    >>> sensor = CountingSensor()
    >>> sensor.on_dead_letter("not_json"); sensor.dead_letters["not_json"]
    1
    """

    batches: int = 0
    events: int = 0
    tokens: int = 0
    seconds: float = 0.0
    predictions: int = 0
    skipped: int = 0  # redelivered events already in their key's state
    tokens_by_partition: Counter[int] = field(default_factory=Counter)
    predictions_by_type: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    checkpoints: int = 0
    checkpoint_records: int = 0
    checkpoint_bytes: int = 0
    checkpoint_seconds: float = 0.0
    restored_keys: int = 0
    restores: int = 0
    restore_seconds: float = 0.0
    commits: int = 0  # commit rounds (exactly-once: one transaction per partition each)
    transactions: int = 0
    commit_failures: int = 0
    commit_seconds: float = 0.0
    rebalances: int = 0
    swaps: int = 0
    updates_rejected: Counter[str] = field(default_factory=Counter)
    startup_refusals: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(BATCH_TOKEN_BUCKETS))
    step: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    commit: Histogram = field(default_factory=lambda: Histogram(COMMIT_BUCKETS))
    swap_pause: Histogram = field(default_factory=lambda: Histogram(SWAP_BUCKETS))

    def on_batch(
        self, n_events: int, n_tokens: int, seconds: float, by_partition: Mapping[int, int]
    ) -> None:
        self.batches += 1
        self.events += n_events
        self.tokens += n_tokens
        self.seconds += seconds
        self.tokens_by_partition.update(by_partition)
        self.batch_tokens.observe(n_tokens)

    def on_step(self, seconds: float) -> None:
        self.step.observe(seconds)

    def on_predictions(self, by_type: Mapping[str, int]) -> None:
        self.predictions += sum(by_type.values())
        self.predictions_by_type.update(by_type)

    def on_latency(self, seconds: Sequence[float]) -> None:
        self.latency.observe_many(seconds)

    def on_dead_letter(self, reason: str) -> None:
        self.dead_letters[reason] += 1

    def on_skipped(self, n: int) -> None:
        self.skipped += n

    def on_commit(self, seconds: float, transactions: int, records: int, size: int) -> None:
        self.commits += 1
        self.transactions += transactions
        self.commit_seconds += seconds
        self.commit.observe(seconds)
        self.checkpoint_records += records
        self.checkpoint_bytes += size

    def on_commit_failure(self) -> None:
        self.commit_failures += 1

    def on_checkpoint(self, records: int, size: int, seconds: float) -> None:
        self.checkpoints += 1
        self.checkpoint_records += records
        self.checkpoint_bytes += size
        self.checkpoint_seconds += seconds

    def on_restore(self, keys: int, seconds: float) -> None:
        self.restores += 1
        self.restored_keys += keys
        self.restore_seconds += seconds

    def on_rebalance(self, assigned: Sequence[int], revoked: Sequence[int]) -> None:
        self.rebalances += 1

    def on_swap(self, pause_seconds: float) -> None:
        self.swaps += 1
        self.swap_pause.observe(pause_seconds)

    def on_update_rejected(self, reason: str) -> None:
        self.updates_rejected[reason] += 1

    def on_startup_refusal(self, reason: str) -> None:
        self.startup_refusals[reason] += 1


class FanoutSensor(Sensor):
    """Hands every report to each of ``sensors`` in turn (a counting sensor and your own)."""

    def __init__(self, *sensors: Sensor) -> None:
        self.sensors = sensors

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            targets = [getattr(s, name) for s in object.__getattribute__(self, "sensors")]

            def fan_out(*args: Any, **kwargs: Any) -> None:
                for target in targets:
                    target(*args, **kwargs)

            return fan_out
        return object.__getattribute__(self, name)


@dataclass
class LiveFigures:
    """What the worker knows at scrape time (read from the pool, the consumer, the model)."""

    active_keys: int = 0
    state_bytes: int = 0
    stored_keys: int = 0
    evictions: int = 0
    pool_restores: int = 0
    assigned: Sequence[int] = ()
    lag: Mapping[int, int] = field(default_factory=dict)
    model_version: str | None = None


# Dead-letter reasons and update-rejection reasons are exposed at 0 from the start, so that a
# rate() over them has a series before the first one happens (and an alert can see it rise).
def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = h.cumulative()
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class MetricsCollector(Collector):
    """A worker's metrics at scrape time, from its `CountingSensor` and its `LiveFigures`."""

    def __init__(
        self,
        sensor: CountingSensor,
        live: Callable[[], LiveFigures],
        *,
        dead_letter_reasons: Iterable[str] = (),
        rejection_reasons: Iterable[str] = (),
        prediction_types: Iterable[str] = (),
    ) -> None:
        self.sensor = sensor
        self.live = live
        self.dead_letter_reasons = tuple(dead_letter_reasons)
        self.rejection_reasons = tuple(rejection_reasons)
        self.prediction_types = tuple(prediction_types)

    def collect(self) -> Iterator[Metric]:  # noqa: PLR0915 - one family after the other
        s = self.sensor
        try:
            live = self.live()
        except Exception:  # a scrape must not fail on a worker that is starting or stopping
            log.debug("live figures unavailable", exc_info=True)
            live = LiveFigures()
        tokens = _counter(
            "stream_rnn_tokens", "Tokens processed, by source partition", ["partition"]
        )
        for partition in sorted({*s.tokens_by_partition, *live.assigned}):
            tokens.add_metric([str(partition)], s.tokens_by_partition.get(partition, 0))
        yield tokens
        preds = _counter(
            "stream_rnn_predictions", "Prediction messages sent, by wire type", ["type"]
        )
        for kind in sorted({*s.predictions_by_type, *self.prediction_types}):
            preds.add_metric([kind], s.predictions_by_type.get(kind, 0))
        yield preds
        dead = _counter(
            "stream_rnn_dead_letters", "Messages sent to the dead-letter topic, by reason",
            ["reason"],
        )  # fmt: skip
        for reason in sorted({*s.dead_letters, *self.dead_letter_reasons}):
            dead.add_metric([reason], s.dead_letters.get(reason, 0))
        yield dead
        yield _histogram(
            "stream_rnn_latency_seconds",
            "Producer timestamp of a token event to its prediction handed to the producer",
            s.latency,
        )
        yield _histogram("stream_rnn_batch_tokens", "Tokens per micro-batch", s.batch_tokens)
        yield _histogram(
            "stream_rnn_step_seconds", "Network pass of one micro-batch (Engine.process)", s.step
        )
        yield GaugeMetricFamily(
            "stream_rnn_active_keys", "Keys whose state is resident in the pool",
            value=live.active_keys,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "stream_rnn_state_bytes", "Bytes of the resident state pool (all slots)",
            value=live.state_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "stream_rnn_stored_keys", "Evicted keys whose state waits on local disk",
            value=live.stored_keys,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "stream_rnn_assigned_partitions", "Tokens-topic partitions this worker owns",
            value=len(live.assigned),
        )  # fmt: skip
        for name, doc, value in (
            ("stream_rnn_evictions", "States evicted from the pool (capacity or TTL)",
             live.evictions),
            ("stream_rnn_restores", "States brought back into the pool (from disk or the "
             "state topic)", live.pool_restores + s.restored_keys),
            ("stream_rnn_redeliveries_skipped", "Redelivered tokens already in their key's "
             "state, not applied again", s.skipped),
            ("stream_rnn_commits", "Successful commit rounds", s.commits),
            ("stream_rnn_commit_failures", "Failed commit rounds", s.commit_failures),
            ("stream_rnn_rebalances", "Partition assignments and revocations", s.rebalances),
            ("stream_rnn_model_swaps", "Model versions swapped in while running", s.swaps),
            ("stream_rnn_checkpoints", "At-least-once state checkpoints written", s.checkpoints),
        ):  # fmt: skip
            counter = _counter(name, doc)
            counter.add_metric([], value)
            yield counter
        yield _histogram("stream_rnn_commit_seconds", "Duration of a commit round", s.commit)
        lag = GaugeMetricFamily(
            "stream_rnn_consumer_lag",
            "Messages of the tokens topic not processed yet (high watermark - next offset)",
            labels=["partition"],
        )
        for partition, value in sorted(live.lag.items()):
            lag.add_metric([str(partition)], value)
        yield lag
        info = GaugeMetricFamily(
            "stream_rnn_model_info", "The model version served (value 1)", labels=["version"]
        )
        if live.model_version is not None:
            info.add_metric([live.model_version], 1)
        yield info
        rejected = _counter(
            "stream_rnn_model_updates_rejected", "Announced model updates refused, by reason",
            ["reason"],
        )  # fmt: skip
        for reason in sorted({*s.updates_rejected, *self.rejection_reasons}):
            rejected.add_metric([reason], s.updates_rejected.get(reason, 0))
        yield rejected
        refused = _counter(
            "stream_rnn_model_startup_refusals",
            "Announced versions refused at start-up (an older one that verifies serves)",
            ["reason"],
        )
        for reason in sorted({*s.startup_refusals, *self.rejection_reasons}):
            refused.add_metric([reason], s.startup_refusals.get(reason, 0))
        yield refused
        yield _histogram(
            "stream_rnn_swap_pause_seconds", "Micro-batches paused by a model swap", s.swap_pause
        )


class MetricsServer:
    """``GET /metrics`` of a registry, from a daemon thread (prometheus-client's server)."""

    def __init__(self, registry: CollectorRegistry, *, port: int, host: str = "127.0.0.1"):
        self.registry, self.port, self.host = registry, port, host
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from prometheus_client import start_http_server  # noqa: PLC0415

        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as err:
            raise StreamError(
                f"cannot serve metrics on {self.host}:{self.port} ({err}); give each worker its "
                "own --metrics-port (or STREAM_RNN_METRICS_PORT), or leave it out"
            ) from err
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
