"""Memory per resident key of the state pool, 1k -> 1M keys, against the raw state size.

Setup (issue 12, section 4): next-token GRU 2 layers x 128, states stored as ``--storage``
(float16 by default), keys ``user-<i>``. For each size a fresh `StatePool` of that capacity is
filled with that many keys through `StatePool.lookup` (as a worker admits them), and the
process's resident memory grows by what the pool holds: the state tensors, the per-slot
counters (position, sequence number, applied offset, partition, flags, last use) and the key
index (a Python dict from key to slot and the key strings themselves). The raw state size is
what the states alone need: layers x hidden x bytes per value (x 2 for an LSTM).

Run: ``.venv/bin/python simulations/memory_sweep.py [--sizes 1000 10000 100000 1000000]
[--storage float16] [--hidden 128] [--layers 2] [--out points.json]``. Target: <= 1.25x the raw
size at 1M keys. ``python -m simulations.bench --only memory`` runs every point in a fresh
process of this script (a process that freed memory before would lend it to the next pool).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stream_rnn.engine.pool import StatePool
from stream_rnn.model import ModelConfig

ADMIT_CHUNK = 65_536  # keys admitted per lookup call (a micro-batch admits at most its keys)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def resident_bytes() -> int:
    """The process's resident set size now (/proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Point:
    keys: int
    bytes_per_key: float
    raw_per_key: int
    tensors_per_key: float  # what the pool's state tensors hold (no counters, no index)

    @property
    def ratio(self) -> float:
        return self.bytes_per_key / self.raw_per_key

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "ratio": self.ratio}


def measure(keys: int, cfg: ModelConfig, storage: str) -> Point:
    """Fill a fresh pool of capacity ``keys`` with ``keys`` keys; resident bytes per key."""
    gc.collect()
    before = resident_bytes()
    pool = StatePool(cfg, keys, storage=storage)
    names = [f"user-{i}" for i in range(keys)]
    for start in range(0, keys, ADMIT_CHUNK):
        pool.lookup(names[start : start + ADMIT_CHUNK])
    assert len(pool) == keys, f"the pool holds {len(pool)} of {keys} keys"
    grown = resident_bytes() - before
    raw = cfg.num_layers * cfg.hidden_size * BYTES[storage] * (2 if cfg.cell == "lstm" else 1)
    point = Point(keys, grown / keys, raw, pool.nbytes / keys)
    del pool, names
    gc.collect()
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--storage", choices=sorted(BYTES), default="float16")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cell", choices=["gru", "lstm", "rnn_tanh"], default="gru")
    parser.add_argument("--out", type=Path, default=None, help="also write the points as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(
        task="next-token", cell=args.cell, vocab_size=256, embed_dim=64,
        hidden_size=args.hidden, num_layers=args.layers,
    )  # fmt: skip
    print(f"{args.cell.upper()} {args.layers}x{args.hidden}, storage {args.storage}")
    print(f"{'keys':>10} {'bytes/key':>10} {'raw':>6} {'ratio':>6} {'states/key':>11}")
    points = [measure(n, cfg, args.storage) for n in args.sizes]
    for p in points:
        print(f"{p.keys:>10,} {p.bytes_per_key:>10.0f} {p.raw_per_key:>6} {p.ratio:>6.2f} "
              f"{p.tensors_per_key:>11.0f}")  # fmt: skip
    last = points[-1]
    met = "met" if last.ratio <= 1.25 else "MISSED"
    print(f"target: <= 1.25x the raw size at {last.keys:,} keys: {last.ratio:.2f} ({met})")
    if args.out is not None:
        args.out.write_text(json.dumps([p.to_dict() for p in points], indent=2) + "\n")


if __name__ == "__main__":
    main()
