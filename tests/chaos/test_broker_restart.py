"""Broker outage: the Kafka broker is down for 30 s mid-stream; workers ride it out.

Two exactly-once workers of one group under a steady kafka-python load (idempotent, retrying
through the outage). The session's broker is stopped (SIGTERM: a controlled shutdown), stays
down for 30 s, and is started again on the same port and data; it is always left running,
even if the test fails. The workers must not exit (their open transactions wait for the
broker, within ``--broker-timeout``, 120 s by default) and must resume exactly: every state
and every prediction equal to the offline pass, none seen twice by a read_committed reader.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import ChaosWorkersFactory, TokenLoad, verify_exact, wait_consumed
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory, WorkerProcess

from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.stream.commit import EXIT_TEMPFAIL

N_KEYS = 200
N_TOKENS = 12_000
RATE = 250.0  # tokens/s: 48 s of load
STOP_AT_S = 12.0
DOWN_S = 30.0


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
    exit_logs: list[str] = []

    def supervise() -> None:
        """Record (and replace) a worker that exited: the test fails on it afterwards."""
        for i, w in enumerate(workers):
            if not w.alive():
                exits.append(w.proc.returncode)
                exit_logs.append(w.log_tail(30))
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
    assert not exits, f"workers exited during the outage with {exits}:\n" + "\n---\n".join(
        exit_logs
    )
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


BRIEF_TIMEOUT_S = 5.0


def test_a_worker_exits_with_a_message_past_the_broker_timeout(
    gru_model: Path,
    kafka_broker: str,
    local_kafka: LocalKafka,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
) -> None:
    """With work in hand and no broker for longer than ``--broker-timeout``, a worker says so
    and exits (75: restart it later) without committing; a new one resumes exactly."""
    topics = stream_topics(partitions=2)
    group = unique_name("broker-timeout")
    pool = chaos_workers(
        gru_model, topics, group, "--max-batch", "256", "--broker-timeout", str(BRIEF_TIMEOUT_S)
    )
    [worker] = pool.start_assigned(1)
    keys = [f"meter-{i:03d}" for i in range(50)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=4_000, rate=400.0, seed=9)
    load.start()
    worker.wait_until(lambda s: s["tokens"] > 500, "processing")
    try:
        assert local_kafka.stop(), "the session broker was not running"
        worker.proc.wait(BRIEF_TIMEOUT_S + 60)
    finally:
        local_kafka.start()
    log = worker.log_path.read_text(errors="replace")
    assert worker.proc.returncode == EXIT_TEMPFAIL, log[-3000:]
    assert "--broker-timeout" in log, log[-3000:]
    load.join(180)
    assert load.error is None and load.sent == 4_000
    replacement = pool.start()
    wait_consumed(kafka_broker, group, topics, timeout=120, workers=lambda: [replacement])
    assert replacement.stop() == 0, replacement.log_tail()
    verdict = verify_exact(kafka_broker, topics, gru_model)
    print(f"\nbroker timeout: worker exited {worker.proc.returncode}; {verdict.summary()}")
    assert verdict.tokens == 4_000
