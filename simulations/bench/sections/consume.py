"""faust's consume path, stock against the bulk consumer the worker uses, against the
pass-through pipe (`simulations.consume_bench.run`: empty agents in their own processes, one
backlog of token events on 4 partitions, rows alternating over rounds; medians).
"""

from __future__ import annotations

import argparse

from simulations.bench.results import Section
from simulations.bench.runner import Context
from simulations.consume_bench import run as consume_run

FULL = {"messages": 100_000, "partitions": 4, "keys": 10_000, "repeat": 2}
QUICK = {"messages": 2_000, "partitions": 4, "keys": 100, "repeat": 1}


def run(ctx: Context, section: Section) -> None:
    cfg = QUICK if ctx.quick else FULL
    args = argparse.Namespace(**cfg, bootstrap=ctx.bootstrap(), out=None, agent=None)
    results = consume_run(args)
    section.config = dict(cfg)
    section.data = {"summary": results["summary"], "ratios": results["ratios"]}
    rate = {row: s["rate"] for row, s in results["summary"].items()}
    bulk = "empty faust agent, bulk consumer (the worker's)"
    section.add("consume.bulk_vs_stock", bulk, rate["bulk"], "msgs/s",
                ref="empty faust agent, faust's own consumer", ref_value=rate["stock"])  # fmt: skip
    section.add("consume.bulk_vs_pipe", bulk, rate["bulk"], "msgs/s",
                ref="pass-through pipe: aiokafka + decode + 1 produce/msg",
                ref_value=rate["pipe"])  # fmt: skip
