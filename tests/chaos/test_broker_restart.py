"""Broker restart: the Kafka broker stops and starts again mid-stream; nothing lost or doubled.

Two workers of one group under a steady kafka-python load (idempotent, retrying through the
outage). The session's broker is stopped (SIGTERM: a controlled shutdown) and started again
on the same port and data; it is always left running, even if the test fails.

Allowed behaviour: a worker whose outputs the broker did not take after every retry exits
with status 75 (EX_TEMPFAIL, `worker.EXIT_OUTPUTS_LOST`) without committing the micro-batch,
and is meant to be restarted (its supervisor's job; here the test's). Workers that stay up
reconnect by themselves. Either way the final states and predictions must be exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import ChaosWorkersFactory, TokenLoad, verify_exact, wait_consumed
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory, WorkerProcess

from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.stream.worker import EXIT_OUTPUTS_LOST

N_KEYS = 200
N_TOKENS = 12_000
RATE = 250.0  # tokens/s: 48 s of load
STOP_AT_S = 12.0
DOWN_S = 5.0


def test_workers_ride_out_a_broker_restart(
    gru_model: Path,
    kafka_broker: str,
    local_kafka: LocalKafka,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=4)
    group = unique_name("broker-restart")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "256")
    workers: list[WorkerProcess] = pool.start_assigned(2)

    keys = [f"device-{i:04d}" for i in range(N_KEYS)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=N_TOKENS, rate=RATE, seed=3)
    load.start()
    exits: list[int] = []

    def supervise() -> None:
        """Restart a worker that exited (75 is the documented retry-later exit)."""
        for i, w in enumerate(workers):
            if not w.alive():
                exits.append(w.proc.returncode)
                workers[i] = pool.start()

    time.sleep(STOP_AT_S)
    try:
        assert local_kafka.stop(), "the session broker was not running"
        time.sleep(DOWN_S)
    finally:
        restarted = local_kafka.start()  # the same port and data; a no-op if it runs
    assert restarted.bootstrap == kafka_broker
    back = time.monotonic()
    while load.is_alive() and time.monotonic() - back < 180:
        supervise()
        time.sleep(0.5)
    load.join(60)
    assert load.error is None, f"the producer failed: {load.error!r}"
    assert load.sent == N_TOKENS
    supervise()

    drained = wait_consumed(kafka_broker, group, topics, timeout=180, workers=lambda: workers)
    for w in workers:
        assert w.stop() == 0, f"graceful stop failed:\n{w.log_tail()}"
    assert set(exits) <= {EXIT_OUTPUTS_LOST}, f"workers exited with {exits}"
    verdict = verify_exact(kafka_broker, topics, gru_model)
    elapsed = time.monotonic() - started
    print(
        f"\nbroker restart: down {DOWN_S:.0f}s + start; worker exits {exits or 'none'}; "
        f"drained {drained:.1f}s after the load; {verdict.summary()}; {elapsed:.0f}s in all"
    )
    verdict.record(record_property)
    record_property("worker_restarts", len(exits))
    record_property("seconds", round(elapsed, 1))
    assert verdict.tokens == N_TOKENS
