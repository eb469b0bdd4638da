"""Runs a fault plan against a live system while a Kafka replay sends, on a thread of its own.

`FaultInjector` is the replay's `stream_rnn.replay.result.FaultHooks`: `run_kafka` tells it
when the replay started and how many messages went out; it fires the plan's active faults
(`stream_rnn.replay.faults.Fault`, malformed messages are in the schedule already) one after
another, each once its trigger is reached and the one before it is done, and asks the replay
to keep waiting (`busy`) while a fault is due or under way. What a fault does is the
`FaultTarget`'s business (`stream_rnn.ops.replay_system.ReplaySystem` for the real one; tests
pass a fake), so this module holds only the scheduling: which fault, when, what became of it.

A fault that raises is recorded ``failed`` with its error, and the rest are ``skipped`` (the
system is no longer in the state the plan assumed); so are those whose trigger the replay
never reached. Every record carries its times on the replay's clock and its wall time.

Example::

    injector = FaultInjector(faults, target, say=print)
    try:
        result = run_kafka(schedule, ..., faults=injector)
    finally:
        records = injector.finish()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from stream_rnn.replay.faults import Fault
from stream_rnn.replay.result import FaultRecord

TICK_S = 0.05
FINISH_TIMEOUT_S = 30.0


class FaultTarget(Protocol):
    """Carries faults out on a live system."""

    def apply(self, fault: Fault, mark: Callable[[str], None], halted: Callable[[], bool]) -> str:
        """Do ``fault`` and wait (bounded) until its effect is complete; a line on what was
        done. ``mark(label)`` notes a moment for the plots; ``halted()`` turns True when the
        replay is ending: leave any wait then. Raises on failure (the message says why)."""
        ...


class FaultInjector:
    """Fires a fault plan during a replay (see the module docstring)."""

    def __init__(
        self,
        faults: Sequence[Fault],
        target: FaultTarget,
        *,
        say: Callable[[str], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = TICK_S,
    ) -> None:
        self.faults = [f for f in faults if f.active]
        self.target = target
        self.say = say
        self.clock = clock
        self.tick_s = tick_s
        self.records = [FaultRecord(f.spec, f.kind, f.order) for f in self.faults]
        self._t0 = 0.0
        self._wall0 = 0.0
        self._total = 0
        self._sent = 0
        self._next = 0  # index of the fault that runs or waits next
        self._running = False
        self._failed = False
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="replay-faults", daemon=True)

    # ------------------------------------------------------------------ FaultHooks
    def begin(self, t0: float, total: int) -> None:
        self._t0, self._wall0, self._total = t0, time.time(), total
        if self.faults:
            self._thread.start()

    def sent(self, count: int) -> None:
        self._sent = count

    def busy(self) -> bool:
        with self._lock:
            if self._running:
                return True
            if self._failed or self._next >= len(self.faults):
                return False
            return self._due(self.faults[self._next])

    # ------------------------------------------------------------------ the end
    def finish(self, timeout: float = FINISH_TIMEOUT_S) -> list[FaultRecord]:
        """The replay is over: stop waiting for triggers, let a fault under way leave its wait
        (``timeout``), and return every record, unreached ones ``skipped``."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for record in self.records:
            if record.at is not None and record.done_at is None:
                record.status = "failed"
                record.detail = f"still under way {timeout:.0f}s after the replay ended"
            elif record.at is None and not record.detail:
                record.detail = (
                    "not started: an earlier fault failed"
                    if self._failed
                    else "not started: the replay ended before its trigger"
                )
        return list(self.records)

    def elapsed(self) -> float:
        """Seconds on the replay's clock (its outputs' ``at``)."""
        return self.clock() - self._t0

    # ------------------------------------------------------------------ the thread
    def _due(self, fault: Fault) -> bool:
        return fault.when.due(self._sent, self._total, self.elapsed())

    def _run(self) -> None:
        for i, fault in enumerate(self.faults):
            while not self._due(fault):
                if self._halt.wait(self.tick_s):
                    return
            with self._lock:
                self._running = True
            try:
                ok = self._fire(fault, self.records[i])
            finally:
                with self._lock:
                    self._running = False
                    self._next = i + 1
                    self._failed = self._failed or not ok
            if not ok or self._halt.is_set():
                return

    def _fire(self, fault: Fault, record: FaultRecord) -> bool:
        record.at, record.wall = self.elapsed(), time.time()
        late = ""
        if fault.when.seconds is not None and record.at - fault.when.seconds > 1.0:
            late = f" ({record.at - fault.when.seconds:.1f}s late: the fault before it ran long)"
        self.say(f"{record.at:6.1f}s  fault {fault.spec}{late}")

        def mark(label: str) -> None:
            record.markers.append((self.elapsed(), label))

        try:
            detail = self.target.apply(fault, mark, self._halt.is_set)
        except Exception as err:  # noqa: BLE001 - any failure is the fault's outcome
            record.status, record.detail = "failed", f"{type(err).__name__}: {err}"
            record.done_at = self.elapsed()
            self.say(f"{record.done_at:6.1f}s  fault {fault.spec} FAILED: {err}")
            return False
        record.status, record.done_at = "done", self.elapsed()
        record.detail = detail + late
        self.say(f"{record.done_at:6.1f}s  {detail}")
        return True
