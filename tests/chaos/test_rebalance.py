"""Rebalance: a third worker joins mid-stream and later leaves; states move with partitions.

Two workers of one group share a 6-partition tokens topic under a steady kafka-python load
(each holds 3; with the third, 2 each). tests/integration/test_worker.py covers 3 workers on 4.
A third joins (every member revokes, checkpoints and releases its partitions; each new owner
restores its partitions' keys from the state topic before it processes them), takes
partitions, processes them, and leaves on SIGTERM (a graceful revocation: final checkpoint,
then its partitions and their states move back). Afterwards the topics must show the contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import ChaosWorkersFactory, TokenLoad, verify_exact, wait_consumed
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory

N_KEYS = 200
N_TOKENS = 12_000
RATE = 300.0  # tokens/s: 40 s of load
JOIN_AT_S = 8.0
LEAVE_AT_S = 24.0


def test_states_follow_partitions_when_a_worker_joins_and_leaves(
    gru_model: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=6)
    group = unique_name("rebalance")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "256")
    first, second = pool.start_assigned(2)

    keys = [f"session-{i:04d}" for i in range(N_KEYS)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=N_TOKENS, rate=RATE, seed=2)
    load_started = time.monotonic()
    load.start()
    time.sleep(max(0.0, JOIN_AT_S - (time.monotonic() - load_started)))
    third = pool.start()
    joined = third.wait_until(
        lambda s: bool(s["assigned"]) and s["tokens"] > 0, "partitions assigned and processing"
    )
    # every member must now hold partitions: the join moved some of them, with their states
    for w in (first, second):
        w.wait_until(lambda s: bool(s["assigned"]), "partitions after the join", 30)
    time.sleep(max(0.0, LEAVE_AT_S - (time.monotonic() - load_started)))
    third_last = third.status() or joined
    assert third.stop() == 0, f"the leaving worker did not stop cleanly:\n{third.log_tail()}"
    for w in (first, second):
        w.wait_until(lambda s: len(s["assigned"]) == 3, "its share back after the leave", 30)
    load.join(120)
    assert load.error is None, f"the producer failed: {load.error!r}"
    assert load.sent == N_TOKENS

    drained = wait_consumed(
        kafka_broker, group, topics, timeout=120, workers=lambda: [first, second]
    )
    statuses = [w.status() or {} for w in (first, second)]
    for w in (first, second):
        assert w.stop() == 0, f"graceful stop failed:\n{w.log_tail()}"
    verdict = verify_exact(kafka_broker, topics, gru_model)
    elapsed = time.monotonic() - started

    moved = third_last["restored_keys"] + sum(s["restored_keys"] for s in statuses)
    print(
        f"\nrebalance: third worker held {third_last['assigned']} and processed "
        f"{third_last['tokens']} tokens after restoring {third_last['restored_keys']} keys; "
        f"{moved} key states restored in all; drained {drained:.1f}s after the load; "
        f"{verdict.summary()}; {elapsed:.0f}s in all"
    )
    assert third_last["restored_keys"] > 0, "the joining worker restored no key states"
    assert third_last["tokens"] > 0
    verdict.record(record_property)
    record_property("restored_keys", moved)
    record_property("seconds", round(elapsed, 1))
    assert verdict.tokens == N_TOKENS
