"""Fault injection during a replay: the plan, parsed from ``--fault KIND[:ARG]@WHEN`` options.

``WHEN`` is ``P%`` (once P percent of the messages were handed over, 0-100) or ``Ss`` (S seconds
after the replay started, its clock). ``KIND[:ARG]``:

==================  ==============================================================================
``kill[:W]``        SIGKILL the owned worker W (``worker-2`` or ``2``; default: the newest one
                    running); done when the others own every partition again
``restart[:W]``     start a worker that an earlier kill or remove stopped (default: the last one);
                    done when it owns partitions
``add[:W]``         start one more worker (default name: the next ``worker-N``); done when it owns
                    partitions (the rebalance)
``remove[:W]``      stop the worker W gracefully (SIGTERM: it commits and leaves the group);
                    done when the others own every partition
``broker-restart``  stop the local broker (``--kafka-data-dir``), keep it down S seconds
``[:S]``            (default 2), start it again on the same port and data
``publish:MODEL``   register MODEL (a checkpoint directory, or a version of ``--registry``), make
                    it production and announce it; done when every owned worker serves it.
                    In process: the engine swaps to MODEL before the message the trigger
                    names (nothing is registered)
``malformed[:N]``   N malformed messages (default 10: one of each kind below), sent together
                    among the replay's own; each must come back as a dead letter with its reason
==================  ==============================================================================

Faults run one after another in the order given (each waits for its trigger and for the one
before it to be done), so triggers of one unit must not go backwards. Malformed messages are
part of the schedule itself (`inject_malformed`): they go out at their place whatever the
other faults do, and the report's dead-letter check counts them by reason.

Example::

    faults = check_plan(parse_faults(["kill:2@40%", "restart@60%", "malformed:20@10%"]),
                        PlanContext(kafka=True, workers=2, duration=schedule.duration))
    schedule, injected = inject_malformed(schedule, faults)
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace

from stream_rnn.replay.analysis import Check
from stream_rnn.replay.exceptions import ReplayError
from stream_rnn.replay.result import FaultRecord
from stream_rnn.replay.schedule import Schedule, Scheduled

KINDS: dict[str, str] = {
    "kill": "kill[:WORKER]@WHEN",
    "restart": "restart[:WORKER]@WHEN",
    "add": "add[:WORKER]@WHEN",
    "remove": "remove[:WORKER]@WHEN",
    "broker-restart": "broker-restart[:SECONDS_DOWN]@WHEN",
    "publish": "publish:MODEL_DIR_OR_VERSION@WHEN",
    "malformed": "malformed[:COUNT]@WHEN",
}
WORKER_KINDS = frozenset({"kill", "restart", "add", "remove"})
DEFAULT_DOWN_S = 2.0
MAX_DOWN_S = 300.0
MAX_MALFORMED = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_WHEN = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>%|s)$")
# (reason, key: False = no key, True = a key of its own that never had a state, value)
MALFORMED: tuple[tuple[str, bool, bytes], ...] = (
    ("not_json", True, b'{"v":1,"type":"token","token":"a"'),
    ("not_object", True, b'["a","b"]'),
    ("missing_field", True, b'{"v":1,"type":"token"}'),
    ("extra_field", True, b'{"v":1,"type":"token","token":"a","colour":"red"}'),
    ("wrong_type", True, b'{"v":1,"type":"token","token":true}'),
    ("bad_version", True, b'{"v":2,"type":"token","token":"a"}'),
    ("bad_value", True, b'{"v":1,"type":"teleport"}'),
    ("missing_key", False, b'{"v":1,"type":"token","token":"a"}'),
    ("token_out_of_range", True, b'{"v":1,"type":"token","token":1000000000}'),
    ("unknown_key", True, b'{"v":1,"type":"end"}'),
)


@dataclass(frozen=True)
class Trigger:
    """When a fault fires: a ``fraction`` of the messages handed over, or ``seconds`` after the
    replay's start (exactly one of them)."""

    fraction: float | None = None
    seconds: float | None = None

    def threshold(self, total: int) -> int:
        """Messages handed over before a fraction trigger fires."""
        return math.ceil((self.fraction or 0.0) * total - 1e-9)

    def due(self, sent: int, total: int, elapsed: float) -> bool:
        if self.fraction is not None:
            return sent >= self.threshold(total)
        return elapsed >= (self.seconds or 0.0)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.seconds:g}s"


@dataclass(frozen=True)
class Fault:
    """One ``--fault``: its kind, argument and trigger; ``order`` is its place in the plan;
    ``worker`` the worker it acts on (set by `check_plan`)."""

    spec: str
    kind: str
    when: Trigger
    order: int = 0
    arg: str | None = None
    worker: str | None = None
    count: int = 0  # malformed: messages
    down_s: float = 0.0  # broker-restart: seconds down

    @property
    def active(self) -> bool:
        """Whether it acts on the live system (malformed messages are part of the schedule)."""
        return self.kind != "malformed"


def _usage(spec: str, problem: str) -> ReplayError:
    forms = ", ".join(KINDS.values())
    return ReplayError(
        f"--fault {spec!r}: {problem}. A fault is KIND[:ARG]@WHEN with WHEN = P% (of the "
        f"messages sent) or Ss (seconds after the start), e.g. kill:worker-2@40% or "
        f"malformed:20@12s; kinds: {forms}"
    )


def parse_fault(spec: str, order: int = 0) -> Fault:
    """One ``--fault`` value (see the module docstring); `ReplayError` says what is wrong."""
    head, at, when_text = spec.strip().rpartition("@")
    if not at or not head:
        raise _usage(spec, "say when it fires after '@'")
    kind, colon, arg = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise _usage(spec, f"unknown kind {kind!r}")
    match = _WHEN.match(when_text.strip().lower())
    if match is None:
        raise _usage(spec, f"WHEN {when_text!r} is neither P% nor Ss (a unit is required)")
    number = float(match["num"])
    if match["unit"] == "%":
        if number > 100:
            raise _usage(spec, f"{number:g}% is more than all the messages")
        when = Trigger(fraction=number / 100)
    else:
        when = Trigger(seconds=number)
    value = arg.strip() if colon else None
    if colon and not value:
        raise _usage(spec, "nothing after ':' (leave the ':' out for the default)")
    fault = Fault(spec, kind, when, order, value)
    if kind in WORKER_KINDS and value is not None:
        name = f"worker-{value}" if value.isdigit() else value
        if not _NAME.match(name):
            raise _usage(spec, f"{value!r} is no worker name (worker-2, or just 2)")
        return replace(fault, arg=name)
    if kind == "broker-restart":
        down = _number(spec, value.removesuffix("s") if value else None, DEFAULT_DOWN_S)
        if not 0 <= down <= MAX_DOWN_S:
            raise _usage(spec, f"the broker may stay down 0 to {MAX_DOWN_S:g} s, not {down:g}")
        return replace(fault, down_s=down)
    if kind == "malformed":
        count = _number(spec, value, float(len(MALFORMED)))
        if count != int(count) or not 1 <= count <= MAX_MALFORMED:
            raise _usage(spec, f"the count must be a whole number from 1 to {MAX_MALFORMED}")
        return replace(fault, count=int(count))
    if kind == "publish" and value is None:
        raise _usage(spec, "publish needs the model: publish:DIR or publish:VERSION")
    return fault


def _number(spec: str, text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        number = float(text)
    except ValueError:
        raise _usage(spec, f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise _usage(spec, f"{text!r} is not a finite number")
    return number


def parse_faults(specs: Sequence[str]) -> list[Fault]:
    """Every ``--fault`` in the order given."""
    return [parse_fault(spec, order) for order, spec in enumerate(specs)]


@dataclass(frozen=True)
class PlanContext:
    """What the replay can act on: the target, the workers it starts, the timing."""

    kafka: bool
    workers: int = 0
    fixed_model: bool = False  # the owned workers serve --model: they never swap
    duration: float = 0.0  # the schedule's, seconds
    fast: bool = False  # --max: the schedule's times are not the replay's clock


def worker_names(n: int) -> list[str]:
    """The names of the workers a replay starts: worker-1 .. worker-N."""
    return [f"worker-{i}" for i in range(1, n + 1)]


def check_plan(faults: Sequence[Fault], ctx: PlanContext) -> list[Fault]:
    """Refuse a plan the replay cannot carry out, saying what to pass; resolve the worker each
    worker fault acts on. Whether the broker is a local one is checked where it is known."""
    for fault in faults:
        if fault.active and not ctx.kafka and fault.kind != "publish":
            raise ReplayError(
                f"--fault {fault.spec}: only malformed messages and published models can be "
                "injected in process; give --to kafka for faults of the live system"
            )
        if fault.kind in WORKER_KINDS and ctx.workers == 0:
            raise ReplayError(
                f"--fault {fault.spec} acts on workers the replay starts itself: pass --workers N "
                "(they serve --model DIR or --registry DIR)"
            )
        if fault.kind == "publish" and ctx.fixed_model and ctx.workers:
            raise ReplayError(
                f"--fault {fault.spec}: the replay's workers serve the fixed --model, which never "
                "swaps; give --registry DIR instead of --model so that they follow it"
            )
        when = fault.when
        if when.seconds is not None and ctx.fast and fault.kind == "malformed":
            raise ReplayError(
                f"--fault {fault.spec}: under --max the schedule's seconds are not the replay's "
                "clock, so malformed messages take a place among the messages: use P%"
            )
        if when.seconds is not None and not ctx.fast and when.seconds > ctx.duration:
            raise ReplayError(
                f"--fault {fault.spec}: the replay's schedule lasts {ctx.duration:.1f} s; give "
                "a time within it (or a share of the messages, P%)"
            )
    _check_order(faults)
    return _resolve_workers(faults, ctx.workers)


def _check_order(faults: Sequence[Fault]) -> None:
    last: dict[str, tuple[float, str]] = {}
    for fault in faults:
        if fault.when.fraction is not None:
            unit, value = "%", fault.when.fraction
        else:
            unit, value = "s", fault.when.seconds or 0.0
        if unit in last and value < last[unit][0]:
            raise ReplayError(
                f"--fault {fault.spec} fires before --fault {last[unit][1]}, given before it: "
                "faults run one after another in the order given, so give them in the order "
                "they should fire"
            )
        last[unit] = (value, fault.spec)


def _resolve_workers(faults: Sequence[Fault], n: int) -> list[Fault]:
    running = worker_names(n)
    stopped: list[str] = []
    known = set(running)
    out: list[Fault] = []
    for fault in faults:
        name = fault.arg
        if fault.kind in ("kill", "remove"):
            if not running:
                raise ReplayError(f"--fault {fault.spec}: no worker runs by then")
            name = name or running[-1]
            if name not in running:
                raise ReplayError(
                    f"--fault {fault.spec}: {name} does not run by then (running: "
                    f"{', '.join(running)})"
                )
            running.remove(name)
            stopped.append(name)
        elif fault.kind == "restart":
            if not stopped:
                raise ReplayError(
                    f"--fault {fault.spec}: no worker was stopped before it; give a kill or "
                    "remove fault first (or add a worker with add@WHEN)"
                )
            name = name or stopped[-1]
            if name not in stopped:
                raise ReplayError(
                    f"--fault {fault.spec}: {name} was not stopped by an earlier kill or remove "
                    f"(stopped: {', '.join(stopped)})"
                )
            stopped.remove(name)
            running.append(name)
        elif fault.kind == "add":
            if name is None:
                name = f"worker-{max(_number_of(k) for k in known) + 1}"
            if name in known:
                raise ReplayError(
                    f"--fault {fault.spec}: a worker named {name} exists already; use "
                    "restart for a stopped one, or another name"
                )
            known.add(name)
            running.append(name)
        out.append(replace(fault, worker=name) if fault.kind in WORKER_KINDS else fault)
    if n and not running:
        raise ReplayError(
            "the faults leave no worker running, so the rest of the replay would never be "
            "answered; end with a restart or an add"
        )
    return out


def _number_of(name: str) -> int:
    tail = name.rpartition("-")[2]
    return int(tail) if name.startswith("worker-") and tail.isdigit() else 0


# ----------------------------------------------------------------------------- malformed
def inject_malformed(
    schedule: Schedule, faults: Sequence[Fault]
) -> tuple[Schedule, dict[int, tuple[int, int]]]:
    """The schedule with each malformed fault's messages in place (a new `Schedule`), and per
    fault ``order``: (index of its first message, how many). Each message names the
    dead-letter reason it must come back with; keyed ones use keys of their own that no
    message of the schedule uses."""
    events = schedule.events
    times = [ev.t for ev in events]
    taken = {ev.key for ev in events if ev.key is not None}
    inserts: list[tuple[int, int, list[Scheduled]]] = []  # (position, order, messages)
    for fault in faults:
        if fault.kind != "malformed":
            continue
        if fault.when.fraction is not None:
            pos = fault.when.threshold(len(events))
            t = times[pos - 1] if pos > 0 else 0.0
        else:
            t = fault.when.seconds or 0.0
            pos = bisect_left(times, t)
        messages = []
        for j in range(fault.count):
            reason, keyed, value = MALFORMED[j % len(MALFORMED)]
            key = _ghost_key(f"fault-{fault.order}-{reason}-{j}", taken) if keyed else None
            messages.append(Scheduled(t, "raw", key, value, expect=reason))
        inserts.append((pos, fault.order, messages))
    if not inserts:
        return schedule, {}
    inserts.sort(key=lambda item: item[0])  # stable: faults at one place keep their order
    out: list[Scheduled] = []
    placed: dict[int, tuple[int, int]] = {}
    shift_at: list[tuple[int, int]] = []  # (old position, messages inserted there)
    done = 0
    for pos, order, messages in inserts:
        out += events[done:pos]
        placed[order] = (len(out), len(messages))
        out += messages
        shift_at.append((pos, len(messages)))
        done = pos
    out += events[done:]
    sequences = [replace(s, first=s.first + _shift(shift_at, s.first)) for s in schedule.sequences]
    count = sum(n for _, n in placed.values())
    notes = [*schedule.notes, f"{count} malformed messages injected by --fault"]
    return Schedule(out, sequences, schedule.source, schedule.timing, notes), placed


def _shift(shift_at: list[tuple[int, int]], index: int) -> int:
    return sum(n for pos, n in shift_at if pos <= index)


def _ghost_key(base: str, taken: set[str]) -> str:
    key, n = base, 0
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    taken.add(key)
    return key


def malformed_records(
    faults: Sequence[Fault], placed: dict[int, tuple[int, int]], sent_at: list[float], wall0: float
) -> list[FaultRecord]:
    """A record per malformed fault: sent when its first message was due (``sent_at``)."""
    out = []
    for fault in faults:
        if fault.kind != "malformed" or fault.order not in placed:
            continue
        first, count = placed[fault.order]
        at = sent_at[first] if first < len(sent_at) else math.nan
        record = FaultRecord(fault.spec, fault.kind, fault.order)
        if math.isnan(at):
            record.detail = "not sent: the replay ended before its place"
        else:
            reasons = sorted({MALFORMED[j % len(MALFORMED)][0] for j in range(count)})
            record.status, record.at, record.done_at = "done", at, at
            record.wall = wall0 + at
            record.detail = (
                f"{count} malformed messages (messages {first}-{first + count - 1}), "
                f"reasons {', '.join(reasons)}"
            )
            record.markers.append((at, f"{count} malformed"))
        out.append(record)
    return out


# ----------------------------------------------------------------------------- report
MERGE_S = 0.5


def fault_markers(records: Sequence[FaultRecord]) -> list[tuple[float, str]]:
    """Every record's ``(at, label)`` markers, for the report's over-time plots; moments less
    than ``MERGE_S`` apart become one (``takeover + worker-2 restarted``), as their labels
    would cover each other on a plot."""
    out: list[tuple[float, str]] = []
    for at, label in sorted(m for r in records for m in r.markers):
        if out and at - out[-1][0] < MERGE_S:
            out[-1] = (out[-1][0], f"{out[-1][1]} + {label}")
        else:
            out.append((at, label))
    return out


def fault_check(records: Sequence[FaultRecord]) -> Check:
    """The check of the plan itself: every fault done (what became of the others)."""
    done = sum(r.status == "done" for r in records)
    detail = f"{done} of {len(records)} faults done"
    bad = [f"{r.spec}: {r.status} ({r.detail})" for r in records if r.status != "done"]
    if bad:
        detail += "; " + "; ".join(bad)
    return Check("faults injected as planned", done == len(records), detail)


def workers_check(exits: Sequence[str]) -> Check:
    """The replay's own workers stopped only when a fault stopped them (``exits`` describes
    each that exited by itself)."""
    return Check(
        "owned workers exited only when a fault stopped them",
        not exits,
        "; ".join(exits) if exits else "no worker exited by itself",
    )
