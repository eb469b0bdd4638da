"""Through the local broker: `simulations.broker_bench`'s rows, latency curve and targets.

The broker section runs ``broker_bench.run`` (worker drains in both guarantees, per token and
in chunks, against the pass-through pipe; faust references; the hand-written agent; /metrics
on and off; Engine.process against the dense ceiling; the latency curve by offered load) and
turns its results into rows. The exactly-once section reads the broker section's drains when
it ran, and otherwise drains the same backlog once per guarantee itself.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict
from typing import Any

from simulations import broker_bench as bb
from simulations.bench.results import Section
from simulations.bench.runner import Context

QUICK = bb.BenchConfig(
    tokens=2_000,
    chunk=8,
    naive_tokens=200,
    keys=100,
    latency_seconds=1.0,
    latency_rate=500.0,
    fractions=(0.5,),
    faust_refs=False,
    direct=False,
    metrics_pair=False,
    drain_timeout_s=120.0,
)
HALF = 0.5


def _config(ctx: Context) -> bb.BenchConfig:
    return QUICK if ctx.quick else bb.BenchConfig()


def run_broker(ctx: Context, section: Section) -> None:
    cfg = _config(ctx)
    results = bb.run(ctx.bootstrap(), cfg, ctx.scratch("broker"), log=ctx.log)
    fill_broker(section, bb._finite(results))


def fill_broker(section: Section, results: dict[str, Any]) -> None:
    """``section`` from the results of ``broker_bench.run`` (a live run or its saved JSON)."""
    rows, cfg = results["rows"], results["config"]
    titles = bb.row_titles(cfg["chunk"])
    section.config = cfg
    section.data = {"results": results, "titles": titles}
    pipe = titles["pipe"]
    for name, title in titles.items():
        if name not in rows or name in ("dense", "ceiling"):
            continue  # the references of other rows, not rows of their own
        rate = rows[name]["rate"]
        row_id = f"broker.{name}"
        if name == "pipe":
            section.add(row_id, title, rate, "msgs/s", ref=titles["ceiling"],
                        ref_value=rows["ceiling"]["rate"])  # fmt: skip
        elif name in ("engine", "engine_cold"):
            section.add(row_id, title, rate, "tokens/s", ref=titles["dense"],
                        ref_value=rows["dense"]["rate"],
                        ratio=results["ratios"][f"{name}/dense"])  # fmt: skip
        else:
            unit = "msgs/s" if name in ("queue", "take", "events") else "tokens/s"
            section.add(row_id, title, rate, unit, ref=pipe, ref_value=rows["pipe"]["rate"],
                        ref_unit="msgs/s")  # fmt: skip
    if "naive" in rows:
        section.add("broker.worker_vs_naive", titles["worker"], rows["worker"]["rate"],
                    "tokens/s", ref=titles["naive"], ref_value=rows["naive"]["rate"])  # fmt: skip
    for name, title, _, _ in bb.worker_configs(bb.BenchConfig(chunk=cfg["chunk"])):
        curve = results["curve"].get(name, [])
        half = bb.at_fraction(results, name, HALF)
        if half is None:
            continue
        e2e = half["end_to_end_s"]
        low = min(curve, key=lambda lat: lat["fraction"])
        what = f"{title}: latency at half load"
        if low is not half:
            section.add(f"broker.latency.{name}.p50", f"{what}, p50", e2e["p50"] * 1e3, "ms",
                        ref=f"p50 at {low['fraction']:.0%} load",
                        ref_value=low["end_to_end_s"]["p50"] * 1e3)  # fmt: skip
        section.add(f"broker.latency.{name}.p99", f"{what}, p99", e2e["p99"] * 1e3, "ms",
                    ref="p50 at half load", ref_value=e2e["p50"] * 1e3)  # fmt: skip
    for what, value, target, met in bb.targets(results):
        section.target(what, value, target, met=met)
    if not results["curve"]:
        section.notes.append("no latency curve in this run")


# ------------------------------------------------------------------------------ exactly-once
def run_eo(ctx: Context, section: Section) -> None:
    broker = ctx.done.get("broker")
    if broker is not None and broker.error is None and "results" in broker.data:
        fill_eo(section, broker.data["results"])
        section.notes.append("from the broker section's drains (same run)")
        return
    cfg = _config(ctx)
    bootstrap, workdir = ctx.bootstrap(), ctx.scratch("eo")
    model_dir = bb.build_model(workdir / "model", cfg)
    rng = random.Random(cfg.seed)  # noqa: S311 - benchmark data
    messages = bb.make_messages(cfg.tokens, cfg.keys, cfg.vocab, rng)
    rows: dict[str, Any] = {}
    for name, _title, extra, chunk in bb.worker_configs(cfg):
        if chunk != 1:
            continue
        layout = bb.stream_topics(bootstrap, f"eo-{name}", cfg.partitions)
        asyncio.run(bb.produce(bootstrap, layout.tokens, messages))
        rows[name], _, _ = bb.measure_worker(
            bootstrap, model_dir, layout, cfg.tokens, cfg, workdir, args=extra, count="tokens"
        )
        ctx.log(f"{name}: {rows[name]['rate']:,.0f} tokens/s")
    fill_eo(section, {"config": asdict(cfg), "rows": rows, "curve": {}})
    section.notes.append("its own pair of drains (the broker section did not run)")


def fill_eo(section: Section, results: dict[str, Any]) -> None:
    """Exactly-once against at-least-once, per token and in chunks, drains and latency."""
    rows, cfg = results["rows"], results["config"]
    titles = bb.row_titles(cfg["chunk"])
    section.config = {k: cfg[k] for k in ("tokens", "keys", "partitions", "chunk") if k in cfg}
    pairs = [("worker", "worker_alo"), ("worker_chunks", "worker_chunks_alo")]
    for eo, alo in pairs:
        if eo in rows and alo in rows:
            section.add(f"eo.{eo}", f"{titles[eo]}: drain", rows[eo]["rate"], "tokens/s",
                        ref=titles[alo], ref_value=rows[alo]["rate"])  # fmt: skip
    for eo, alo in pairs:
        got = bb.at_fraction(results, eo, HALF), bb.at_fraction(results, alo, HALF)
        if got[0] is not None and got[1] is not None:
            section.add(f"eo.latency.{eo}", f"{titles[eo]}: p50 latency at half load",
                        got[0]["end_to_end_s"]["p50"] * 1e3, "ms", ref=f"{titles[alo]}, same",
                        ref_value=got[1]["end_to_end_s"]["p50"] * 1e3)  # fmt: skip
    section.data = {"drains": {k: rows[k] for k in sum(pairs, ()) if k in rows}}
