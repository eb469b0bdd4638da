"""Hot swap under load: the pause a published model version causes a live worker.

A registry with v0 (GRU 2x128) and a signed-announcement key; one exactly-once worker that
follows it (``--registry``, ``--update-key-file``, ``--history 32``) holds 10,000 keys with 8
tokens of history each, fed at a steady rate by a paced producer. Then new versions are
published and announced one after the other (policies keep, reset, rewarm, in turn), each
once the previous one serves. The pause of each swap is the worker's own measure (micro-batches
held, from the commit of everything processed under the old version to the new version in
place: ``last_swap.pause_s`` in its status).

Reference, measured during the same load: the worker's mean micro-batch time (busy seconds /
micro-batches between the first and the last swap).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import secrets
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from simulations import broker_bench as bb
from simulations.bench.results import Section
from simulations.bench.runner import Context
from stream_rnn.ops.processes import worker_status
from stream_rnn.registry.checkpoint import read_manifest
from stream_rnn.registry.versions import Registry
from stream_rnn.replay.publish import publish_model
from stream_rnn.stream.codec import encode_event
from stream_rnn.stream.messages import TokenEvent

POLICIES = ("keep", "reset", "rewarm")
HISTORY = 32


@dataclass(frozen=True)
class SwapConfig:
    keys: int = 10_000
    warm_tokens_per_key: int = 8
    rate: float = 2_000.0  # tokens/s of the paced load
    per_policy: int = 3
    swap_timeout_s: float = 60.0
    gap_s: float = 1.0  # between a swap and the next announcement


QUICK = SwapConfig(keys=200, warm_tokens_per_key=2, rate=200.0, per_policy=1, gap_s=0.3)


class Publisher:
    """Add checkpoints to a registry, make them production and announce them, signed."""

    def __init__(self, root: Path, bootstrap: str, topic: str) -> None:
        self.registry = Registry(root)
        self.bootstrap, self.topic = bootstrap, topic
        self.key_file = root.parent / "update.key"
        self.key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.key_file.chmod(0o600)
        self.key = self.key_file.read_text().strip().encode()

    def publish(self, model_dir: Path, policy: str) -> str:
        return publish_model(
            self.registry, str(model_dir), bootstrap=self.bootstrap, topic=self.topic,
            key=self.key, policy=policy,  # type: ignore[arg-type]
        )  # fmt: skip


def run(ctx: Context, section: Section) -> None:
    sc = QUICK if ctx.quick else SwapConfig()
    bcfg = bb.BenchConfig(keys=sc.keys)
    bootstrap, workdir = ctx.bootstrap(), ctx.scratch("swap")
    section.config = {**asdict(sc), "model": f"GRU {bcfg.layers}x{bcfg.hidden}",
                      "history": HISTORY, "guarantee": "exactly-once (default)"}  # fmt: skip
    policies = [p for _ in range(sc.per_policy) for p in POLICIES]
    models = [
        bb.build_model(workdir / f"model-{i}", replace(bcfg, seed=i))
        for i in range(len(policies) + 1)
    ]
    publisher = Publisher(workdir / "registry", bootstrap, f"bench-updates-{secrets.token_hex(3)}")
    publisher.publish(models[0], "keep")
    layout = bb.stream_topics(bootstrap, "swap", bcfg.partitions)
    rng = random.Random(3)  # noqa: S311 - benchmark data
    now = time.time()
    warm = [
        (f"user-{k}".encode(), encode_event(TokenEvent(f"t{rng.randrange(bcfg.vocab - 4)}", now)))
        for _ in range(sc.warm_tokens_per_key)
        for k in range(sc.keys)
    ]
    asyncio.run(bb.produce(bootstrap, layout.tokens, warm))
    source = ["--registry", str(publisher.registry.root),
              "--update-key-file", str(publisher.key_file)]  # fmt: skip
    worker, port = bb.start_worker(
        bootstrap, models[0], layout, bcfg, workdir, model_args=source,
        args=["--history", str(HISTORY)], env={"STREAM_RNN_MODEL_UPDATES_TOPIC": publisher.topic},
    )  # fmt: skip

    def status() -> dict[str, Any]:
        return worker_status(port) or {}

    stop = threading.Event()
    load: dict[str, Any] = {}

    def feed() -> None:
        try:
            load.update(asyncio.run(bb.latency_run(bootstrap, layout, sc.rate, 3600.0, bcfg,
                                                   stop=stop)))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            load["error"] = repr(err)

    feeder = threading.Thread(target=feed, name="swap-load", daemon=True)
    swaps: list[dict[str, Any]] = []
    try:
        worker.wait_for(lambda: status().get("tokens", 0) >= len(warm), "warm-up drained",
                        bcfg.drain_timeout_s)  # fmt: skip
        feeder.start()
        time.sleep(2.0)  # the load flows
        before = status()
        for model_dir, policy in zip(models[1:], policies, strict=True):
            version = read_manifest(model_dir).version
            published = time.monotonic()
            publisher.publish(model_dir, policy)
            worker.wait_for(lambda v=version: status().get("model_version") == v,  # type: ignore[misc]
                            f"serving {version}", sc.swap_timeout_s)  # fmt: skip
            swap = dict(status()["last_swap"])
            swap["served_after_s"] = time.monotonic() - published
            swaps.append(swap)
            ctx.log(f"swap {len(swaps)} ({policy}): pause {swap['pause_s'] * 1e3:.1f} ms, "
                    f"{swap['keys_resident']:,} resident keys")  # fmt: skip
            time.sleep(sc.gap_s)
        after = status()
    finally:
        stop.set()
        if feeder.ident is not None:  # started
            feeder.join(90)
        worker.stop()
    if "error" in load:
        raise RuntimeError(f"the paced load failed: {load['error']}")
    batches = after["batches"] - before["batches"]
    batch_ms = (after["busy_s"] - before["busy_s"]) / max(batches, 1) * 1e3
    ref = f"mean micro-batch time under the same load ({batches:,} batches)"
    section.data = {"swaps": swaps, "batch_ms": batch_ms, "batches": batches,
                    "load": {k: load.get(k) for k in ("rate_sent", "sent", "received",
                                                      "end_to_end_s", "worker_latency_s")}}  # fmt: skip
    for policy in POLICIES:
        pauses = [s["pause_s"] * 1e3 for s in swaps if s["policy"] == policy]
        if not pauses:
            section.notes.append(f"no swap applied policy {policy}")
            continue
        what = f"swap pause, policy {policy}, {sc.keys:,} resident keys"
        section.add(f"swap.{policy}.p50", f"{what}: p50 of {len(pauses)}",
                    statistics.median(pauses), "ms", ref=ref, ref_value=batch_ms)  # fmt: skip
        section.add(f"swap.{policy}.max", f"{what}: max of {len(pauses)}", max(pauses), "ms",
                    ref=ref, ref_value=batch_ms)  # fmt: skip
    changed = [s for s in swaps if s["policy"] != s["policy_announced"]]
    if changed:
        section.notes.append(f"{len(changed)} swaps applied another policy than announced: "
                             + "; ".join(s["note"] for s in changed))  # fmt: skip
