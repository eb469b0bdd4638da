"""Engine in process: `Engine.process` against a naive one-event loop and a dense ceiling.

`simulations.engine_bench.measure`: GRU 2x128, vocabulary 256, 10,000 keys, micro-batches of
1,024, torch's default threads; the three paths back to back in every round, medians of the
per-round ratios. Targets (issue 3): >= 25x naive, >= 0.5x the ceiling.
"""

from __future__ import annotations

from simulations.bench.results import Section
from simulations.bench.runner import Context
from simulations.engine_bench import measure

FULL = {"tokens": 200_000, "naive_tokens": 20_000, "keys": 10_000, "repeat": 5}
QUICK = {"tokens": 2_048, "naive_tokens": 256, "keys": 1_000, "repeat": 1}


def run(ctx: Context, section: Section) -> None:
    got = measure(**(QUICK if ctx.quick else FULL))  # type: ignore[arg-type]
    section.config = got["config"]
    section.data = {"rounds": got["rounds"]}
    naive = "naive loop: one event at a time, batch 1, states in a dict, same top-5 head"
    ceiling = "dense ceiling: same tokens as dense (1024, 1) batches, no bookkeeping"
    what = "Engine.process (group, gather, packed step, scatter, top-5)"
    # rates: medians over the rounds; ratios: medians of the per-round ratios
    section.add("engine.vs_naive", what, got["engine"], "tokens/s", ref=naive,
                ref_value=got["naive"], ratio=got["engine/naive"])  # fmt: skip
    section.add("engine.vs_ceiling", what, got["engine"], "tokens/s", ref=ceiling,
                ref_value=got["ceiling"], ratio=got["engine/ceiling"])  # fmt: skip
    section.target("engine / naive loop", got["engine/naive"], ">= 25",
                   met=got["engine/naive"] >= 25)  # fmt: skip
    section.target("engine / dense ceiling", got["engine/ceiling"], ">= 0.5",
                   met=got["engine/ceiling"] >= 0.5)  # fmt: skip
