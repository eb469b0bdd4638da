"""Key explosion: 40,000 keys through a pool of 1,000; memory stays bounded, states stay exact.

One worker with ``--capacity 1000`` and an LSTM 2x256 (h and c: 4 KiB of state per key, so
that residency would show: 20,000 resident keys take 78 MiB). Phase A sends 2 tokens to each
of 2,000 keys, phase B to 18,000 more, phase C 2 more tokens to all 20,000 (evicted to the
worker's on-disk store long before: they must continue exactly where they left off), phase D
2 tokens to 20,000 new keys. The worker's peak RSS (VmHWM) is read after each phase.

The bound is on memory per *key*, not per token: phase C (40,000 tokens to 20,000 keys that
come back from disk) and phase D (40,000 tokens to 20,000 new keys) do the same work — every
token evicts a state and admits another — except that D adds 20,000 keys. So D's peak growth
minus C's is what the new keys cost, and it must stay below a quarter of what their states
alone would take resident (78 MiB). Measured: C and D each grow the peak by 17-26 MiB (native
allocations that grow with tokens processed early in a worker's life and level off: about 22,
22, 13, 12, 8 MiB over seven such phases; Python object counts stay flat), D minus C 0-8 MiB.
The remaining per-key memory is small and bounded (the producers' key -> partition caches,
200,000 keys at most). From 2,000 to 20,000 keys the peak grows by about 40 MiB, nearly all of
it warm-up of the eviction path; it is reported, not judged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from chaos_harness import (
    ALPHABET,
    ChaosWorkersFactory,
    produce,
    tiny_model,
    verify_exact,
    wait_consumed,
)
from kafka_fixtures import unique_name
from stream_harness import StreamTopicsFactory, WorkerProcess

CAPACITY = 1_000
FIRST_KEYS = 2_000
KEYS = 20_000
STATE_BYTES = 2 * 2 * 256 * 4  # (h, c) x 2 layers x 256 float32 per key
MIB = 1 << 20


def peak_rss(worker: WorkerProcess) -> int:
    """The worker's peak resident set (VmHWM) in bytes."""
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_evicted_keys_return_exactly_and_memory_stays_bounded(
    tmp_path: Path,
    kafka_broker: str,
    stream_topics: StreamTopicsFactory,
    chaos_workers: ChaosWorkersFactory,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    model_dir = tiny_model(tmp_path, cell="lstm", layers=2, hidden=256, embed=16)
    topics = stream_topics(partitions=4)
    group = unique_name("keys")
    pool = chaos_workers(model_dir, topics, group, "--capacity", str(CAPACITY))
    worker = pool.start("--max-batch", "512")
    worker.wait_until(lambda s: len(s["assigned"]) == 4, "all 4 partitions assigned")
    rng = random.Random(7)
    peaks: list[int] = []
    seconds: list[float] = []

    def phase(keys: range, tokens_per_key: int = 2) -> None:
        order = [f"k{i:05d}" for i in keys for _ in range(tokens_per_key)]
        rng.shuffle(order)  # interleaved; per-key order is the log's order anyway
        t0 = time.monotonic()
        produce(kafka_broker, topics.tokens, ((k, rng.choice(ALPHABET)) for k in order))
        wait_consumed(kafka_broker, group, topics, timeout=240, workers=lambda: [worker])
        seconds.append(time.monotonic() - t0)
        peaks.append(peak_rss(worker))

    phase(range(FIRST_KEYS))  # A
    phase(range(FIRST_KEYS, KEYS))  # B
    phase(range(KEYS))  # C: every key returns, almost all of them from disk
    phase(range(KEYS, 2 * KEYS))  # D: as many new keys again
    status = worker.status() or {}
    assert worker.stop() == 0, f"graceful stop failed:\n{worker.log_tail()}"

    verdict = verify_exact(kafka_broker, topics, model_dir)
    elapsed = time.monotonic() - started
    warmup, returning, doubling = peaks[1] - peaks[0], peaks[2] - peaks[1], peaks[3] - peaks[2]
    per_keys = doubling - returning  # what D's new keys cost beyond the same work on old keys
    resident = KEYS * STATE_BYTES  # what 20,000 more resident states would take
    print(
        f"\nkey explosion: {2 * KEYS} keys through a pool of {CAPACITY}: peak RSS "
        + ", ".join(f"{p / MIB:.0f}" for p in peaks)
        + f" MiB after {FIRST_KEYS}/{KEYS}/{KEYS} (returned)/{2 * KEYS} keys: "
        f"+{warmup / MIB:.1f} MiB from {FIRST_KEYS} to {KEYS} keys, +{returning / MIB:.1f} MiB "
        f"as they returned, +{doubling / MIB:.1f} MiB from {KEYS} to {2 * KEYS}: "
        f"{per_keys / MIB:+.1f} MiB for the new keys (their states resident: "
        f"{resident / MIB:.0f} MiB); "
        f"{status.get('evictions')} evictions, {status.get('pool_restores')} restores from "
        f"disk; phases " + "/".join(f"{x:.0f}" for x in seconds) + f" s; {verdict.summary()}; "
        f"{elapsed:.0f}s in all"
    )
    verdict.record(record_property)
    for n, peak in zip(("2k", "20k", "20k_returned", "40k"), peaks, strict=True):
        record_property(f"peak_rss_mib_{n}_keys", round(peak / MIB, 1))
    record_property("peak_rss_mib_new_keys", round(per_keys / MIB, 1))
    record_property("seconds", round(elapsed, 1))
    assert verdict.keys == 2 * KEYS
    assert status["keys_resident"] <= CAPACITY
    assert status["evictions"] >= 2 * KEYS - CAPACITY
    assert status["pool_restores"] >= KEYS - 2 * CAPACITY  # phase C came back from disk
    assert per_keys < resident / 4, (
        f"peak RSS grew by {doubling / MIB:.1f} MiB from {KEYS} to {2 * KEYS} keys but only "
        f"{returning / MIB:.1f} MiB for the same number of tokens to returning keys; holding "
        f"the new keys' states would take {resident / MIB:.0f} MiB: memory grows with keys"
    )
