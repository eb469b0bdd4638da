"""Every benchmark section, in the order a run takes them.

In-process sections first (they need no broker and leave the machine quiet for the others),
then the ones against the local broker. Estimates are seconds on the reference machine (2
shared cores, no GPU): a full run, and ``--quick``.
"""

from __future__ import annotations

from simulations.bench.runner import SectionSpec
from simulations.bench.sections import (
    broker,
    checkpoint,
    chunk,
    codec,
    consume,
    engine,
    memory,
    recovery,
    scale,
    swap,
)

SECTIONS: list[SectionSpec] = [
    SectionSpec("engine", "Engine in process: engine vs naive loop vs dense ceiling",
                engine.run, broker=False, estimate_s=35, estimate_quick_s=3),
    SectionSpec("codec", "Input decoding: msgspec vs orjson + checks vs json + jsonschema",
                codec.run, broker=False, estimate_s=10, estimate_quick_s=1),
    SectionSpec("chunk", "The worker's batch path in process: token chunks vs one per record",
                chunk.run, broker=False, estimate_s=10, estimate_quick_s=2),
    SectionSpec("memory", "Memory per resident key, 1k -> 1M keys, float16 states",
                memory.run, broker=False, estimate_s=60, estimate_quick_s=6),
    SectionSpec("broker", "Through the local broker: worker rows, references, latency curve",
                broker.run_broker, broker=True, estimate_s=330, estimate_quick_s=40),
    SectionSpec("eo", "Exactly-once cost: exactly-once vs at-least-once",
                broker.run_eo, broker=True, estimate_s=1, estimate_quick_s=1),
    SectionSpec("sweep", "Scale sweep: partitions x workers, drain of a backlog",
                scale.run, broker=True, estimate_s=200, estimate_quick_s=30),
    SectionSpec("recovery", "Recovery: a worker with N keys killed, a new one takes over",
                recovery.run, broker=True, estimate_s=60, estimate_quick_s=15),
    SectionSpec("swap", "Hot swap under load: pause of a published version",
                swap.run, broker=True, estimate_s=60, estimate_quick_s=12),
    SectionSpec("checkpoint", "Checkpoint cost (at-least-once): checkpoints on vs off",
                checkpoint.run, broker=True, estimate_s=90, estimate_quick_s=14),
    SectionSpec("consume", "faust's consume path: bulk vs stock vs pass-through pipe",
                consume.run, broker=True, estimate_s=60, estimate_quick_s=8),
]  # fmt: skip
BY_NAME = {spec.name: spec for spec in SECTIONS}
