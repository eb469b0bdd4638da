"""Kill loop: workers SIGKILLed at random moments under a steady load; every state stays exact.

Two workers of one group share a 4-partition tokens topic; a background kafka-python producer
sends 20,000 random tokens to 200+ random keys at a steady rate while a killer SIGKILLs a
random worker at random moments (at least 5 times) and starts a replacement, waiting until it
has partitions again. A kill lands anywhere: in a micro-batch, between outputs and the
checkpoint, in a checkpoint, in a restore. Afterwards the workers stop gracefully and the
topics must show the contract (see `chaos_harness.verify_exact`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import ChaosWorkersFactory, TokenLoad, verify_exact, wait_consumed
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory, WorkerProcess

N_KEYS = 240
N_TOKENS = 20_000
RATE = 320.0  # tokens/s: ~62 s of load, room for 5+ kill/restart cycles
MIN_KILLS = 5
KILL_PHASE_S = 150.0
REJOIN_S = 60.0


def test_kill_loop_keeps_every_state_exact(
    gru_model: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=4)
    group = unique_name("kill-loop")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "256")
    workers: list[WorkerProcess] = pool.start_assigned(2)

    rng = random.Random(4)
    keys = [f"user-{i:04d}" for i in range(N_KEYS)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=N_TOKENS, rate=RATE, seed=4)
    load.start()
    kills, rejoin = 0, []
    while (load.is_alive() or kills < MIN_KILLS) and time.monotonic() - started < KILL_PHASE_S:
        time.sleep(rng.uniform(0.5, 4.0))
        victim = rng.randrange(len(workers))
        workers[victim].proc.kill()  # SIGKILL: no revocation, no final checkpoint
        workers[victim].proc.wait(10)
        kills += 1
        restarted = time.monotonic()
        workers[victim] = pool.start()
        workers[victim].wait_until(lambda s: bool(s["assigned"]), "reassigned", REJOIN_S)
        rejoin.append(time.monotonic() - restarted)
    load.join(120)
    assert load.error is None, f"the producer failed: {load.error!r}"
    assert load.sent == N_TOKENS
    assert kills >= MIN_KILLS, f"only {kills} kills in {KILL_PHASE_S:.0f}s"

    drained = wait_consumed(kafka_broker, group, topics, timeout=120, workers=lambda: workers)
    for w in workers:
        assert w.stop() == 0, f"graceful stop failed:\n{w.log_tail()}"

    verdict = verify_exact(kafka_broker, topics, gru_model)
    elapsed = time.monotonic() - started
    print(
        f"\nkill loop: {kills} SIGKILLs, rejoin {min(rejoin):.1f}-{max(rejoin):.1f}s, drained "
        f"{drained:.1f}s after the load; {verdict.summary()}; {elapsed:.0f}s in all"
    )
    verdict.record(record_property)
    record_property("kills", kills)
    record_property("seconds", round(elapsed, 1))
    assert verdict.tokens == N_TOKENS
