"""Replay in process: the schedule through an engine in micro-batches at its timing, no broker.

Messages go through the worker's own Kafka-free path (`stream_rnn.stream.adapter.Adapter`:
decode and validate the wire bytes, the engine's batched step, encode the predictions and dead
letters), as if they had been consumed from one partition at offsets 0, 1, 2, … (message i is
offset i, so a prediction's ``id`` is ``0:i``). Whatever is due is taken as one micro-batch
(up to ``max_batch``); when nothing is due the loop sleeps until the next message's time. A
replay that falls behind its schedule makes larger batches, as a worker does, and the latency
(output time minus the message's scheduled time) shows it. Under ``fast`` (``--max``) batches
are full and the latency counts from the moment a batch was handed over.

The state pool runs on replay time: wall time since the start, or under ``fast`` the
schedule's own times, so that idle gaps longer than the TTL evict keys and their return
restores them in both cases. Idle keys are expired every ``expire_interval_s`` of replay time,
as a worker does.

A model published mid-replay (``--fault publish:MODEL@WHEN``) is an `InprocSwap`: the engine
swaps to it between two micro-batches, exactly before message ``at`` (a batch never spans the
swap point), under the swap policy asked for, as a worker's hot swap does. Each message is
decoded with the tables of the model that steps it (`Adapter.process` takes them from the
engine per batch), so the report's agreement check holds every prediction to the offline pass
of the version it names.

Example::

    engine = Engine(model, manifest, ttl_s=5.0)
    result = run_inproc(schedule, engine, options=InprocOptions(fast=True))
    print(result.pool, len(result.outputs))
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.versions import SwapPolicy
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.faults import Fault
from stream_rnn.replay.result import FaultRecord, NoProgress, Output, Progress, ReplayResult
from stream_rnn.replay.schedule import Schedule, answer_expected, tokens_answered
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.stream.codec import DEFAULT_MAX_BYTES, decode_dead_letter, decode_prediction
from stream_rnn.stream.messages import DEFAULT_MAX_CHUNK_TOKENS

TOPIC = "replay"  # the topic name dead letters of an in-process replay name as their origin


@dataclass(frozen=True)
class InprocOptions:
    """How the in-process replay batches and validates, as a worker's options would.

    ``fast``: no waiting (``--max``); ``max_batch``: most messages per micro-batch;
    ``unknown``, ``max_bytes``, ``max_tokens``: the worker's input checks.
    """

    fast: bool = False
    max_batch: int = 1024
    expire_interval_s: float = 5.0
    unknown: Literal["unk", "reject"] = "unk"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ReplayError(f"--max-batch must be >= 1 message, got {self.max_batch}")


@dataclass(frozen=True)
class InprocSwap:
    """A model swap at message ``at`` (before it, between micro-batches) of an in-process
    replay: the engine swaps to ``model`` (described by ``manifest``) under ``policy``.
    ``spec``/``order``: the ``--fault`` it comes from, for the report."""

    at: int
    model: RecurrentModel
    manifest: Manifest
    policy: SwapPolicy = "keep"
    spec: str = ""
    order: int = 0


class ReplayClock:
    """The pool's clock during a replay: the replay time that `run_inproc` sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_inproc(
    schedule: Schedule,
    engine: Engine,
    *,
    options: InprocOptions | None = None,
    progress: Progress | None = None,
    monotonic: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    swaps: Sequence[InprocSwap] = (),
) -> ReplayResult:
    """Replay ``schedule`` through ``engine`` (a fresh one: its pool is put on replay time);
    ``swaps`` change its model mid-replay (sorted by ``at``)."""
    opts = options or InprocOptions()
    progress = progress or NoProgress()
    pool = engine.pool
    if len(pool) or len(pool.store):
        raise ReplayError("run_inproc needs a fresh engine: its pool already holds states")
    clock = ReplayClock()
    pool.clock = clock  # before any key is admitted: every idle time is in replay time
    adapter = Adapter(unknown=opts.unknown, max_bytes=opts.max_bytes, max_tokens=opts.max_tokens)
    events = schedule.events
    n = len(events)
    times = [e.t for e in events]
    keys = [None if e.key is None else e.key.encode() for e in events]
    sent_at = [math.nan] * n
    raw: list[tuple[float, list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]]]] = []
    batches: list[tuple[float, int]] = []
    expected = answer_expected(
        schedule, tokens_answered(engine.model.config.task, engine.running_estimate)
    )
    progress.start(n, sum(expected))
    answered = 0
    last_expire = 0.0
    span = pool.ttl_s / 10 if pool.ttl_s is not None else math.inf
    pending = sorted(swaps, key=lambda s: s.at)
    versions = [engine.version]
    records_of_faults: list[FaultRecord] = []
    start = monotonic()
    i = 0
    try:
        while i < n:
            while pending and pending[0].at <= i:
                records_of_faults.append(_swap(engine, pending.pop(0), monotonic() - start))
                versions.append(engine.version)
            now = monotonic() - start
            if opts.fast:
                # a batch spans at most a tenth of the TTL of schedule time, so that the idle
                # times the pool measures (per batch) are within 10 % of the recorded ones
                j = min(n, i + opts.max_batch, bisect_right(times, times[i] + span, lo=i + 1))
                if pending:  # the swap point closes the batch
                    j = min(j, max(pending[0].at, i + 1))
                sent_at[i:j] = [now] * (j - i)
                clock.now = times[j - 1]
            else:
                due = bisect_right(times, now, lo=i)
                if due == i:
                    sleep(times[i] - now)
                    continue
                j = min(due, i + opts.max_batch)
                if pending:  # the swap point closes the batch
                    j = min(j, max(pending[0].at, i + 1))
                sent_at[i:j] = times[i:j]
                clock.now = now
            if pool.ttl_s is not None and clock.now - last_expire >= opts.expire_interval_s:
                pool.expire()
                last_expire = clock.now
            records = [RawRecord(keys[k], events[k].value, TOPIC, 0, k) for k in range(i, j)]
            out = adapter.process(records, engine)
            at = monotonic() - start
            raw.append((at, out.predictions, out.dead_letters))
            batches.append((at, out.tokens))
            answered += len(out.predictions) + len(out.dead_letters)
            i = j
            progress.update(i, answered)
    finally:
        progress.close()
    elapsed = monotonic() - start
    result = ReplayResult(
        "inproc",
        schedule.timing.describe(schedule.source),
        sent_at,
        elapsed_s=elapsed,
        sent=n,
        batches=batches,
        versions_served=list(dict.fromkeys(versions)),
    )
    result.faults = records_of_faults
    _match(result, raw, schedule)
    result.pool = {
        "evictions": pool.evictions,
        "expirations": pool.expirations,
        "restores": pool.restores,
        "deletions": pool.deletions,
        "resident": len(pool),
        "stored": len(pool.store),
    }
    return result


def _match(
    result: ReplayResult,
    raw: list[tuple[float, list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]]]],
    schedule: Schedule,
) -> None:
    """Decode the outputs (after the run: decoding is no part of the timed path)."""
    events = schedule.events
    for at, preds, dead in raw:
        for _, value in preds:
            body = decode_prediction(value)
            index = int(body["id"].partition(":")[2])
            if body["key"] != events[index].key:
                result.mismatched_keys += 1
            result.outputs.append(Output(index, at, "prediction", body))
        for _, value in dead:
            body = decode_dead_letter(value)
            result.outputs.append(Output(int(body["offset"]), at, "dead_letter", body))


def _swap(engine: Engine, swap: InprocSwap, at: float) -> FaultRecord:
    """Apply one swap now; what it did, as the report's fault record."""
    record = FaultRecord(swap.spec or f"publish:{swap.manifest.version}", "publish", swap.order)
    record.at, record.wall = at, time.time()
    report = engine.swap(swap.model, swap.manifest, swap.policy)
    record.status, record.done_at = "done", at + report.seconds
    note = f": {report.note}" if report.note else ""
    record.detail = (
        f"{report.from_version} -> {report.to_version} at message {swap.at} (policy "
        f"{report.policy_applied}, {report.keys_resident} resident keys converted){note}"
    )
    record.markers.append((at, f"model {report.to_version[:14]}"))
    return record


def swaps_of(
    faults: Sequence[Fault],
    schedule: Schedule,
    load: Callable[[str], tuple[RecurrentModel, Manifest]],
    policy: SwapPolicy = "keep",
) -> list[InprocSwap]:
    """The in-process swaps of the plan's ``publish`` faults: each one's model (``load``: a
    checkpoint directory or a registry version -> model and manifest) and the message it
    precedes (a share of the messages, or the first message at or after its time)."""
    n = len(schedule.events)
    times = [e.t for e in schedule.events]
    out = []
    for fault in faults:
        if fault.kind != "publish" or fault.arg is None:
            continue
        when = fault.when
        if when.fraction is not None:
            at = when.threshold(n)
        else:
            at = bisect_left(times, when.seconds or 0.0)
        model, manifest = load(fault.arg)
        out.append(InprocSwap(at, model, manifest, policy, fault.spec, fault.order))
    return out
