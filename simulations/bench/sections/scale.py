"""Scale sweep: 1 -> 8 partitions with 1 -> 3 workers of one group, drain rate of a backlog.

For each partition count, the pass-through pipe (`consume_bench.measure_pipe`, one process)
passes a pre-produced backlog of per-token events once: the single-process reference of that
partition count. Then for each worker count, on topics of its own (a drained tokens topic has
its states on its state topic: another group would skip them), N exactly-once workers of one
group (GRU 2x128, 10,000 keys) start together on the empty tokens topic and settle (every
worker holds partitions and together they cover the topic once: joins, rebalances, fencing
and restores are over). Only then is the backlog produced, as fast as the broker takes it,
and the rate is timed from the end of that production to the moment the group committed the
whole backlog (the group's committed offsets: under exactly-once they commit with each
transaction). What the workers drained while it was being produced is left out of the rate.
Where that was most of it, the rate is the whole drain's (first to last prediction) and a note
says so. More workers than partitions: skipped (an idle member measures nothing).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kafka.admin import KafkaAdminClient

from simulations import broker_bench as bb
from simulations.bench.results import Section
from simulations.bench.runner import Context
from simulations.consume_bench import measure_pipe
from stream_rnn.ops.processes import ManagedProcess, worker_status

POLL_S = 0.1
MIN_WINDOW = 0.25  # of the backlog left once produced, for a rate of its own window


@dataclass(frozen=True)
class SweepConfig:
    partitions: tuple[int, ...] = (1, 2, 4, 8)
    workers: tuple[int, ...] = (1, 2, 3)
    tokens: int = 300_000
    keys: int = 10_000
    settle_timeout_s: float = 180.0
    drain_timeout_s: float = 300.0


QUICK = SweepConfig(partitions=(1, 2), workers=(1, 2), tokens=2_000, keys=100)


class GroupProgress:
    """The tokens a consumer group committed on a topic, summed over its partitions."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.group, self.topic = group, topic
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-sweep")

    def committed(self) -> int:
        got = self.admin.list_group_offsets({self.group: None}).get(self.group, {})
        return sum(max(meta.offset, 0) for tp, meta in got.items() if tp.topic == self.topic)

    def close(self) -> None:
        self.admin.close()


def _stop_all(procs: list[ManagedProcess]) -> None:
    """SIGTERM every worker at once, then wait for each (a graceful stop commits)."""
    for proc in procs:
        if proc.alive():
            proc.proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.stop()


def _settled(statuses: list[dict[str, Any] | None], partitions: int) -> bool:
    if not all(s and s.get("assigned") for s in statuses):
        return False
    held = sorted(p for s in statuses if s for p in s["assigned"])
    return held == list(range(partitions))


def drain_group(
    bootstrap: str,
    model_dir: Path,
    layout: Any,
    workers: int,
    messages: list[tuple[bytes, bytes]],
    bcfg: bb.BenchConfig,
    sweep: SweepConfig,
    workdir: Path,
) -> dict[str, Any]:
    """Start ``workers`` workers of a new group on ``layout`` (empty), wait until they settle,
    produce ``messages``; the drain rate from the end of the production to the last commit."""
    group = f"sweep-{secrets.token_hex(3)}"
    n = len(messages)
    started = time.monotonic()
    procs: list[tuple[ManagedProcess, int]] = []
    progress = GroupProgress(bootstrap, group, layout.tokens)
    try:
        for _ in range(workers):
            procs.append(bb.start_worker(bootstrap, model_dir, layout, bcfg, workdir, group=group))

        def alive() -> None:
            for proc, _ in procs:
                if not proc.alive():
                    raise RuntimeError(f"a worker exited ({proc.returncode}):\n{proc.log_tail()}")

        while not _settled([worker_status(port) for _, port in procs], layout.partitions):
            alive()
            if time.monotonic() - started > sweep.settle_timeout_s:
                raise TimeoutError(f"{workers} workers did not settle on {layout.partitions} "
                                   f"partitions in {sweep.settle_timeout_s:.0f} s")  # fmt: skip
            time.sleep(POLL_S)
        settled = time.monotonic()
        produce_rate = asyncio.run(bb.produce(bootstrap, layout.tokens, messages))
        produced, at_produced = time.monotonic(), progress.committed()
        done = at_produced
        while done < n:
            alive()
            if time.monotonic() - produced > sweep.drain_timeout_s:
                raise TimeoutError(f"the group committed {done} of {n} tokens in "
                                   f"{sweep.drain_timeout_s:.0f} s")  # fmt: skip
            time.sleep(POLL_S)
            done = progress.committed()
        finished = time.monotonic()
        cpu = sum(proc.cpu_seconds() for proc, _ in procs)
        statuses = [worker_status(port) or {} for _, port in procs]
    finally:
        progress.close()
        _stop_all([proc for proc, _ in procs])
    got: dict[str, Any] = {
        "settle_s": settled - started,
        "produce_rate": produce_rate,
        "drained_while_producing": at_produced / n,
        "window_s": finished - produced,
        "cpu_s": cpu,
        "rebalances": [s.get("rebalances") for s in statuses],
        "tokens_per_worker": [s.get("tokens") for s in statuses],
    }
    if n - at_produced >= MIN_WINDOW * n and finished > produced:
        got.update(rate=(n - at_produced) / (finished - produced), method="after production")
    else:  # too little left to time: the whole drain, from the first prediction to the last
        offsets = bb.Offsets(bootstrap, layout.predictions, layout.partitions)
        try:
            first, last, _ = offsets.span("ts")
        finally:
            offsets.close()
        got.update(rate=n / max(last - first, 1e-9), method="whole drain")
    return got


def run(ctx: Context, section: Section) -> None:
    sweep = QUICK if ctx.quick else SweepConfig()
    bcfg = bb.BenchConfig(tokens=sweep.tokens, keys=sweep.keys)
    bootstrap, workdir = ctx.bootstrap(), ctx.scratch("sweep")
    model_dir = bb.build_model(workdir / "model", bcfg)
    section.config = {**asdict(sweep), "model": f"GRU {bcfg.layers}x{bcfg.hidden}",
                      "guarantee": "exactly-once (default)", "events": "one token per message",
                      "max_batch": bcfg.max_batch, "worker_env": bb.BASE_ENV}  # fmt: skip
    rng = random.Random(bcfg.seed)  # noqa: S311 - benchmark data
    messages = bb.make_messages(sweep.tokens, sweep.keys, bcfg.vocab, rng)
    grid: list[dict[str, Any]] = []
    pipes: dict[int, float] = {}
    single: dict[int, float] = {}
    for partitions in sweep.partitions:
        cfg = replace(bcfg, partitions=partitions)
        for workers in sweep.workers:
            if workers > partitions:
                section.notes.append(
                    f"{workers} workers on {partitions} partition(s): skipped (a worker "
                    "without a partition does nothing)"
                )
                continue
            if partitions not in pipes:
                backlog = bb.stream_topics(bootstrap, f"sweep-pipe-p{partitions}", partitions)
                asyncio.run(bb.produce(bootstrap, backlog.tokens, messages))
                pipe = asyncio.run(measure_pipe(bootstrap, backlog.tokens, backlog.predictions,
                                                sweep.tokens, partitions))  # fmt: skip
                pipes[partitions] = pipe["rate"]
                ctx.log(f"pipe, {partitions} partitions: {pipe['rate']:,.0f} msgs/s")
            layout = bb.stream_topics(bootstrap, f"sweep-p{partitions}w{workers}", partitions)
            got = drain_group(bootstrap, model_dir, layout, workers, messages, cfg, sweep,
                              workdir)  # fmt: skip
            got.update(partitions=partitions, workers=workers, pipe=pipes[partitions])
            grid.append(got)
            ctx.log(f"{partitions} partitions, {workers} workers: {got['rate']:,.0f} tokens/s "
                    f"({got['method']}; settled after {got['settle_s']:.1f} s; "
                    f"{got['drained_while_producing']:.0%} drained while the backlog was "
                    f"produced at {got['produce_rate']:,.0f}/s)")  # fmt: skip
            if got["method"] != "after production":
                section.notes.append(
                    f"{partitions} partitions, {workers} workers: "
                    f"{got['drained_while_producing']:.0%} of the backlog was drained while it "
                    "was produced; the rate is the whole drain's (first to last prediction)"
                )
            what = f"{partitions} partition{'s' if partitions > 1 else ''}, {workers} worker" + (
                "s" if workers > 1 else ""
            )
            if workers == 1:
                single[partitions] = got["rate"]
                section.add(f"sweep.p{partitions}.w1", f"{what}: drain", got["rate"], "tokens/s",
                            ref=f"pass-through pipe, {what.split(',')[0]}",
                            ref_value=pipes[partitions], ref_unit="msgs/s")  # fmt: skip
            else:
                section.add(f"sweep.p{partitions}.w{workers}", f"{what}: drain", got["rate"],
                            "tokens/s", ref=f"{partitions} partitions, 1 worker",
                            ref_value=single.get(partitions))  # fmt: skip
    section.data = {"grid": grid, "pipe": {str(p): r for p, r in pipes.items()}}
