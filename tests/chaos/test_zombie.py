"""Zombie fencing: a worker paused (SIGSTOP) past its session timeout loses its partitions; when
it wakes up (SIGCONT) while the stream flows, nothing it writes is visible to read_committed
readers, and the state topic's last record per key is the owner's, also after compaction.

Two exactly-once workers share 4 partitions under a steady load. One is frozen mid-stream with
open transactions; its partitions move to the other, whose transactional producers (same
transactional ids, one per partition) fence it and abort what it left open. Woken up, the zombie
still holds a micro-batch's worth of work and tries to commit it: the broker refuses
(ProducerFenced) and the worker exits (75) to rejoin afresh; a replacement joins. The state
topic is compacted hard during the test (tiny segments), so "the last written record per key"
is what a restore would see even if compaction had dropped every other record.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import (
    ChaosWorkersFactory,
    TokenLoad,
    compact_fast,
    count_records,
    end_offsets,
    verify_exact,
    wait_consumed,
)
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory

from stream_rnn.stream.commit import EXIT_TEMPFAIL
from stream_rnn.stream.topics import state_topic

N_KEYS = 200
N_TOKENS = 12_000
RATE = 300.0  # tokens/s: 40 s of load
FREEZE_AT_S = 8.0
FROZEN_S = 14.0  # > the 6 s session timeout of the chaos workers, with room for the rebalance


def test_a_paused_worker_cannot_write_after_its_partitions_moved(
    gru_model: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    topics = stream_topics(partitions=4)
    group = unique_name("zombie")
    pool = chaos_workers(gru_model, topics, group, "--max-batch", "256")
    zombie, owner = pool.start_assigned(2)
    compact_fast(kafka_broker, state_topic(topics.tokens))

    keys = [f"phone-{i:04d}" for i in range(N_KEYS)]
    load = TokenLoad(kafka_broker, topics.tokens, keys, n=N_TOKENS, rate=RATE, seed=7)
    load.start()
    time.sleep(FREEZE_AT_S)
    frozen_assigned = (zombie.status() or {}).get("assigned")
    os.kill(zombie.proc.pid, signal.SIGSTOP)
    try:
        owner.wait_until(lambda s: len(s["assigned"]) == 4, "every partition", FROZEN_S + 30)
        time.sleep(max(0.0, FROZEN_S - (time.monotonic() - started - FREEZE_AT_S)))
    finally:
        os.kill(zombie.proc.pid, signal.SIGCONT)
    # the zombie wakes up with work in hand; it must not get any of it committed
    zombie.proc.wait(60)
    zombie_exit = zombie.proc.returncode
    log = zombie.log_path.read_text(errors="replace")
    replacement = pool.start()
    replacement.wait_until(lambda s: bool(s["assigned"]), "partitions", 60)
    load.join(120)
    assert load.error is None, f"the producer failed: {load.error!r}"
    assert load.sent == N_TOKENS

    workers = [owner, replacement]
    drained = wait_consumed(kafka_broker, group, topics, timeout=120, workers=lambda: workers)
    for w in workers:
        assert w.stop() == 0, f"graceful stop failed:\n{w.log_tail()}"
    assert zombie_exit in (0, EXIT_TEMPFAIL), f"zombie exited {zombie_exit}:\n{log[-3000:]}"

    verdict = verify_exact(kafka_broker, topics, gru_model)
    # what compaction keeps (the last record written per key) must be the owner's state
    time.sleep(3.0)  # let the cleaner run over the rolled segments
    records = count_records(kafka_broker, state_topic(topics.tokens), topics.partitions)
    written = sum(end_offsets(kafka_broker, state_topic(topics.tokens), topics.partitions).values())
    after = verify_exact(kafka_broker, topics, gru_model, last_written=True, predictions=False)
    elapsed = time.monotonic() - started
    print(
        f"\nzombie: frozen {FROZEN_S:.0f}s holding {frozen_assigned}; exit {zombie_exit} "
        f"({'fenced' if 'fenced' in log else 'revoked'}); drained {drained:.1f}s after the "
        f"load; {verdict.summary()}; state topic {records} records after compaction of "
        f"{written} offsets (records + transaction markers) "
        f"(last-written states max |diff| {after.max_state_diff:.2e}); {elapsed:.0f}s in all"
    )
    assert frozen_assigned, "the zombie held no partitions when frozen"
    verdict.record(record_property)
    record_property("zombie_exit", zombie_exit)
    record_property("state_records_after_compaction", records)
    assert records < written, "the state topic was not compacted"
    assert verdict.tokens == N_TOKENS
