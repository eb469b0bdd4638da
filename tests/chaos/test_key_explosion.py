"""Key explosion: 40,000 keys through a pool of 1,000; memory stays bounded, states stay exact.

One worker with ``--capacity 1000`` and an LSTM 2x256 (h and c: 4 KiB of state per key, so
that residency would show: 20,000 resident keys take 78 MiB). Phase A sends 2 tokens to each
of 2,000 keys, phase B to 18,000 more, phases W and C 2 more tokens each to all 20,000
(evicted to the worker's on-disk store long before: they must continue exactly where they left
off; W warms the restore path up), phase D 2 tokens to 20,000 new keys. After each phase the worker goes idle, trims its heap (it gives
freed pages back once per idle period, see stream_rnn/stream/memory.py) and its resident
memory (VmRSS) is read: what it retains. The peak (VmHWM) is reported too.

The bound is on memory per *key*, not per token: phase C (40,000 tokens to 20,000 keys that
come back from disk) and phase D (40,000 tokens to 20,000 new keys) do the same work — every
token evicts a state and admits another — except that D adds 20,000 keys. So D's growth minus
C's is what the new keys cost, and it must stay below a quarter of what their states alone
would take resident (78 MiB). The peak was too noisy for that bound: it moved by up to 20 MiB
between runs with the time a checkpoint fell at and with glibc's heap fragmentation, and
evicted states waiting for their checkpoint were held in memory (now they wait on disk only).
The first phase of returning keys is a warm-up, not a reference: it grew idle RSS by 20-30 MiB
(code pages of the restore path, +7 MiB of libraries alone, and heap) where the next such
phase grows it by a few.
What remains per key is small and bounded (the producers' key -> partition caches, 200,000
keys at most). From 2,000 to 20,000 keys memory grows by tens of MiB, nearly all of it warm-up
of the eviction path; it is reported, not judged.
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


def vm(worker: WorkerProcess, field: str) -> int:
    """A memory figure of the worker from /proc (``VmHWM``: peak, ``VmRSS``: now) in bytes."""
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc status")


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
    retained: list[int] = []
    seconds: list[float] = []
    sent: list[int] = []

    def phase(keys: range, tokens_per_key: int = 2) -> None:
        order = [f"k{i:05d}" for i in keys for _ in range(tokens_per_key)]
        rng.shuffle(order)  # interleaved; per-key order is the log's order anyway
        t0 = time.monotonic()
        produce(kafka_broker, topics.tokens, ((k, rng.choice(ALPHABET)) for k in order))
        wait_consumed(kafka_broker, group, topics, timeout=240, workers=lambda: [worker])
        seconds.append(time.monotonic() - t0)
        sent.append(len(order))
        # idle after the phase's last token: the worker trims its heap once (~1 s later)
        worker.wait_until(
            lambda s: s["heap_trimmed_at_tokens"] == s["tokens"] == sum(sent),
            "the idle worker trimmed its heap after the phase",
            30,
        )
        peaks.append(vm(worker, "VmHWM"))
        retained.append(vm(worker, "VmRSS"))

    phase(range(FIRST_KEYS))  # A
    phase(range(FIRST_KEYS, KEYS))  # B
    phase(range(KEYS))  # W: every key returns, almost all of them from disk (warm-up)
    phase(range(KEYS))  # C: and again
    phase(range(KEYS, 2 * KEYS))  # D: as many new keys again
    status = worker.status() or {}
    assert worker.stop() == 0, f"graceful stop failed:\n{worker.log_tail()}"

    verdict = verify_exact(kafka_broker, topics, model_dir)
    elapsed = time.monotonic() - started
    warmup = retained[2] - retained[0]
    returning, doubling = retained[3] - retained[2], retained[4] - retained[3]
    per_keys = doubling - returning  # what D's new keys cost beyond the same work on old keys
    resident = KEYS * STATE_BYTES  # what 20,000 more resident states would take
    print(
        f"\nkey explosion: {2 * KEYS} keys through a pool of {CAPACITY}: RSS when idle "
        + ", ".join(f"{p / MIB:.0f}" for p in retained)
        + " (peak "
        + ", ".join(f"{p / MIB:.0f}" for p in peaks)
        + f") MiB after {FIRST_KEYS}/{KEYS}/{KEYS} (returned twice)/{2 * KEYS} keys: "
        f"+{warmup / MIB:.1f} MiB from {FIRST_KEYS} to {KEYS} keys and their first return, +{returning / MIB:.1f} MiB "
        f"as they returned again, +{doubling / MIB:.1f} MiB from {KEYS} to {2 * KEYS}: "
        f"{per_keys / MIB:+.1f} MiB for the new keys (their states resident: "
        f"{resident / MIB:.0f} MiB); "
        f"{status.get('evictions')} evictions, {status.get('pool_restores')} restores from "
        f"disk; phases " + "/".join(f"{x:.0f}" for x in seconds) + f" s; {verdict.summary()}; "
        f"{elapsed:.0f}s in all"
    )
    verdict.record(record_property)
    names = ("2k", "20k", "20k_returned", "20k_returned_again", "40k")
    for n, peak, kept in zip(names, peaks, retained, strict=True):
        record_property(f"peak_rss_mib_{n}_keys", round(peak / MIB, 1))
        record_property(f"idle_rss_mib_{n}_keys", round(kept / MIB, 1))
    record_property("idle_rss_mib_new_keys", round(per_keys / MIB, 1))
    record_property("seconds", round(elapsed, 1))
    assert verdict.keys == 2 * KEYS
    assert status["keys_resident"] <= CAPACITY
    assert status["evictions"] >= 2 * KEYS - CAPACITY
    assert status["pool_restores"] >= 2 * (KEYS - 2 * CAPACITY)  # W and C came back from disk
    assert per_keys < resident / 4, (
        f"idle RSS grew by {doubling / MIB:.1f} MiB from {KEYS} to {2 * KEYS} keys but only "
        f"{returning / MIB:.1f} MiB for the same number of tokens to returning keys; holding "
        f"the new keys' states would take {resident / MIB:.0f} MiB: memory grows with keys"
    )
