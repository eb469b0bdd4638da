"""Memory per resident key, 1k -> 1M keys, against the raw state size (issue 12).

Every point runs `simulations.memory_sweep` in a fresh process: a fresh `StatePool` (its
public API only: constructor, ``lookup``, ``len``, ``nbytes``) of N slots filled with N keys as
a worker admits them, resident memory grown per key, against layers x hidden x 2 bytes
(float16 storage). A process of its own per point, because memory freed by an earlier pool
would be lent to the next one and hide part of its cost.
Target: <= 1.25x the raw size at 1M keys.
"""

from __future__ import annotations

import json
import subprocess  # noqa: S404 - this repository's own script, an argument list
import sys

from simulations.bench.machine import REPO
from simulations.bench.results import Section
from simulations.bench.runner import Context

MODELS = [(2, 128), (2, 256)]  # GRU layers x hidden
STORAGE = "float16"
FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000]
QUICK_SIZES = [1_000]
TARGET = 1.25
POINT_TIMEOUT_S = 600.0


def measure_point(keys: int, layers: int, hidden: int, ctx: Context) -> dict[str, float]:
    out = ctx.scratch("memory") / f"gru{layers}x{hidden}-{keys}.json"
    argv = [
        sys.executable, "-m", "simulations.memory_sweep", "--sizes", str(keys),
        "--layers", str(layers), "--hidden", str(hidden), "--storage", STORAGE,
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(  # noqa: S603 - argument list
        argv, cwd=REPO, capture_output=True, text=True, timeout=POINT_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory_sweep {keys} keys failed ({done.returncode}):\n{done.stderr}")
    [point] = json.loads(out.read_text())
    return dict(point)


def run(ctx: Context, section: Section) -> None:
    sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
    section.config = {"models": [f"GRU {n}x{h}" for n, h in MODELS], "storage": STORAGE,
                      "sizes": sizes, "target_ratio": TARGET}  # fmt: skip
    curves: dict[str, list[dict[str, float]]] = {}
    for layers, hidden in MODELS:
        name = f"GRU {layers}x{hidden} {STORAGE}"
        curve = curves[name] = []
        for keys in sizes:
            point = measure_point(keys, layers, hidden, ctx)
            curve.append(point)
            ctx.log(f"{name}, {keys:,} keys: {point['bytes_per_key']:.0f} B/key "
                    f"({point['ratio']:.2f}x raw)")  # fmt: skip
            section.add(f"memory.gru{layers}x{hidden}.{keys}",
                        f"{name}, {keys:,} keys: resident bytes per key", point["bytes_per_key"],
                        "B", ref=f"raw state ({layers} x {hidden} x 2 B)",
                        ref_value=point["raw_per_key"])  # fmt: skip
        last = curve[-1]
        section.target(f"{name}: bytes per key / raw at {last['keys']:,.0f} keys", last["ratio"],
                       f"<= {TARGET}", met=last["ratio"] <= TARGET)  # fmt: skip
    section.data = {"curves": curves}
