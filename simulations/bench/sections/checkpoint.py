"""Checkpoint cost: an at-least-once worker draining a backlog with durable checkpoints on and
off (`tests/chaos/checkpoint_overhead.py`'s ``drain``: GRU 1x16, 10,000 keys, fresh topics per
drain, runs alternating on/off so that drift of a shared machine hits both; medians).

"On" is the default (a checkpoint every 2 s or 50,000 tokens, offsets committed after it);
"off" is ``STREAM_RNN_CHECKPOINT_INTERVAL_S=0``. Exactly-once writes the states in every
transaction instead: its cost is the exactly-once section's.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from types import ModuleType
from typing import Any

from simulations.bench.machine import REPO
from simulations.bench.results import Section
from simulations.bench.runner import Context

SCRIPT = REPO / "tests" / "chaos" / "checkpoint_overhead.py"
FULL = {"tokens": 100_000, "keys": 10_000, "repeats": 2}
QUICK = {"tokens": 5_000, "keys": 100, "repeats": 1}


def load_script() -> ModuleType:
    """The script as a module (it puts tests/chaos and tests on sys.path for its helpers)."""
    if "checkpoint_overhead" in sys.modules:
        return sys.modules["checkpoint_overhead"]
    spec = importlib.util.spec_from_file_location("checkpoint_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(ctx: Context, section: Section) -> None:
    cfg = QUICK if ctx.quick else FULL
    section.config = {**cfg, "model": "GRU 1x16", "guarantee": "at-least-once", "partitions": 4}
    script = load_script()
    bootstrap, workdir = ctx.bootstrap(), ctx.scratch("checkpoint")
    model_dir = script.tiny_model(workdir)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for i in range(cfg["repeats"]):
        for on in (True, False) if i % 2 == 0 else (False, True):
            got = script.drain(bootstrap, model_dir, workdir, checkpoints=on,
                               tokens=cfg["tokens"], keys=cfg["keys"])  # fmt: skip
            runs[on].append(got)
            ctx.log(f"checkpoints {'on' if on else 'off'}: {got['rate']:,.0f} tokens/s, "
                    f"{got['checkpoints']} checkpoints")  # fmt: skip
    on_rate = statistics.median(r["rate"] for r in runs[True])
    off_rate = statistics.median(r["rate"] for r in runs[False])
    section.data = {"on": runs[True], "off": runs[False]}
    section.add("checkpoint.on_off", "at-least-once worker with checkpoints (default): drain",
                on_rate, "tokens/s", ref="same, checkpoints off", ref_value=off_rate)  # fmt: skip
