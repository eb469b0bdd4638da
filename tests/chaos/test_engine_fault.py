"""Engine faults: the engine raises on the k-th micro-batch, after it changed the keys' states.

That is a bug, not bad input: nothing of the batch may be dead-lettered, committed or made
durable. Under exactly-once the worker aborts its open transactions and exits (70); under
at-least-once it exits uncommitted. A replacement worker resumes from the last commit, and
every key's final state and every prediction equal the offline pass: no token lost or doubled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos_harness import ChaosWorkersFactory, TokenLoad, verify_exact, wait_consumed
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory

from stream_rnn.stream.commit import EXIT_SOFTWARE

N_KEYS = 150
N_TOKENS = 5_000
RATE = 400.0
FAULT_BATCH = 12


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_an_engine_fault_loses_and_doubles_nothing(
    guarantee: str,
    gru_model: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=2)
    group = unique_name("fault")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "64", "--guarantee", guarantee)
    faulty = pool.start(env={"STREAM_RNN_FAULT_ENGINE_BATCH": str(FAULT_BATCH)})
    faulty.wait_until(lambda s: bool(s["assigned"]), "partitions")
    keys = [f"cart-{i:04d}" for i in range(N_KEYS)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=N_TOKENS, rate=RATE, seed=5)
    load.start()
    faulty.proc.wait(120)
    log = faulty.log_path.read_text(errors="replace")
    assert faulty.proc.returncode == EXIT_SOFTWARE, log[-3000:]
    assert "injected engine fault" in log and "nothing of it is committed" in log
    healthy = pool.start()
    healthy.wait_until(lambda s: bool(s["assigned"]), "partitions", 60)
    load.join(120)
    assert load.error is None and load.sent == N_TOKENS
    wait_consumed(kafka_broker, group, topics, timeout=120, workers=lambda: [healthy])
    status = healthy.status() or {}
    assert healthy.stop() == 0, healthy.log_tail()
    assert not status.get("dead_letters"), status

    verdict = verify_exact(
        kafka_broker, topics, gru_model, exactly_once=guarantee == "exactly-once"
    )
    elapsed = time.monotonic() - started
    print(f"\nengine fault ({guarantee}): {verdict.summary()}; {elapsed:.0f}s in all")
    verdict.record(record_property)
    assert verdict.tokens == N_TOKENS
