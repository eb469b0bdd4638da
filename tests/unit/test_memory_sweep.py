"""simulations/memory_sweep.py at a tiny size, so that it cannot rot (numbers not judged)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[2] / "simulations" / "memory_sweep.py"


def test_the_sweep_measures_a_filled_pool() -> None:
    spec = importlib.util.spec_from_file_location("memory_sweep", SWEEP)
    assert spec is not None and spec.loader is not None
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep  # dataclasses look their module up by name
    spec.loader.exec_module(sweep)
    cfg = sweep.ModelConfig(
        task="next-token", cell="lstm", vocab_size=16, embed_dim=4, hidden_size=8, num_layers=2
    )
    point = sweep.measure(2_000, cfg, "float16")
    assert point.keys == 2_000
    assert point.raw_per_key == 2 * 8 * 2 * 2  # layers x hidden x 2 bytes, h and c
    assert point.tensors_per_key == point.raw_per_key
    assert point.ratio == point.bytes_per_key / point.raw_per_key
