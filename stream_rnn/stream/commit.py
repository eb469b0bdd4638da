"""The worker's commit protocol as a plain state machine: no faust, no Kafka, no I/O (sans-I/O).

The worker tells it what happened (partitions assigned or revoked, an event accepted, a
micro-batch processed, a commit begun, succeeded or failed, the engine crashed) and it answers
what to do next (process or drop an event, commit now or not, which offsets a commit carries,
retry later or exit with a code and a message). Kafka Streams keeps these decisions in
``TaskManager``/``StreamTask``, apart from its client calls; here they are unit-tested in
microseconds (``tests/unit/test_commit_protocol.py``) and the chaos tests confirm them end to
end.

The two guarantees differ in what a failed commit means:

* **exactly-once**: a commit is one Kafka transaction per partition holding the outputs, the
  changed states and the consumed offsets. The engine's states are already ahead of it, so a
  transaction that fails (fenced, broker gone past ``--broker-timeout``, any error) cannot be
  retried: the worker aborts what is open and exits; whoever owns the partitions next resumes
  from the last committed transaction, so nothing is lost or doubled.
* **at-least-once**: a commit writes the changed states (a checkpoint), then the offsets. A
  failure commits nothing and keeps the offsets for the next attempt, after a backoff, at most
  ``max_attempts`` times in a row; then the worker exits (uncommitted) with a message.

Example::

    protocol = CommitProtocol(exactly_once=True, interval_s=0.1)
    protocol.assigned({0: 120, 1: 0})              # committed offsets of the new partitions
    if protocol.accept(0, 120): ...process it...; protocol.processed(0, 120)
    plan = protocol.begin() if protocol.due() else None
    ...commit plan.offsets...; protocol.succeeded(plan)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Exit codes (sysexits.h): restart the worker later / a bug in the engine.
EXIT_TEMPFAIL = 75
EXIT_SOFTWARE = 70


class ProtocolError(RuntimeError):
    """The worker used the protocol out of order (a bug in the worker, not in the input)."""


@dataclass(frozen=True)
class CommitPlan:
    """What one commit carries: ``{partition: next offset to consume}``."""

    offsets: dict[int, int]
    forced: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do after a failure: retry after ``retry_in_s``, or exit with ``exit_code``."""

    message: str
    exit_code: int | None = None
    retry_in_s: float = 0.0
    abort: bool = False  # exactly-once: abort the open transactions before exiting

    @property
    def exits(self) -> bool:
        return self.exit_code is not None


@dataclass
class CommitProtocol:
    """Commit decisions of one worker (see the module docstring)."""

    exactly_once: bool
    interval_s: float
    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    owned: set[int] = field(default_factory=set)
    # first offset not committed per owned partition: events below it are committed already
    floor: dict[int, int] = field(default_factory=dict)
    # offset after the last event processed, per owned partition
    next_offset: dict[int, int] = field(default_factory=dict)
    # processed but not committed: partition -> next offset to commit
    pending: dict[int, int] = field(default_factory=dict)
    in_flight: CommitPlan | None = None
    failures: int = 0  # failed commits in a row
    commits: int = 0
    _last_commit: float = 0.0
    _began: float = 0.0
    _retry_at: float = 0.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"commit interval must be > 0 seconds, got {self.interval_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        self._last_commit = self.clock()

    # ------------------------------------------------------------------ membership
    def assigned(self, committed: dict[int, int]) -> None:
        """Partitions now owned, with their committed offsets (0 or the log start if none)."""
        for partition, offset in committed.items():
            self.owned.add(partition)
            self.floor[partition] = offset
            self.next_offset[partition] = offset

    def revoked(self, partitions: Iterable[int]) -> None:
        """Partitions no longer owned: their uncommitted work is not ours to commit any more."""
        for p in partitions:
            self.owned.discard(p)
            self.floor.pop(p, None)
            self.next_offset.pop(p, None)
            self.pending.pop(p, None)

    # ------------------------------------------------------------------ events
    def accept(self, partition: int, offset: int) -> bool:
        """Whether to process the event at ``partition:offset``.

        Not ours, already committed (below the floor: fetched again after a rebalance, or
        before the previous owner's last transaction landed) or already processed (a duplicate
        delivery): dropped, never applied.
        """
        if partition not in self.owned:
            return False
        return offset >= self.floor[partition] and offset >= self.next_offset[partition]

    def processed(self, partition: int, offset: int) -> None:
        """The event at ``partition:offset`` was applied and its outputs handed over."""
        if partition not in self.owned:
            raise ProtocolError(f"processed an event of partition {partition}, not owned")
        self.next_offset[partition] = offset + 1
        self.pending[partition] = offset + 1

    # ------------------------------------------------------------------ commits
    def due(self, *, extra: bool = False) -> bool:
        """Whether a commit should start now (``extra``: something besides offsets is pending,
        e.g. state deletions)."""
        if self.in_flight is not None or not (self.pending or extra):
            return False
        now = self.clock()
        return now >= self._retry_at and now - self._last_commit >= self.interval_s

    def begin(self, *, force: bool = False) -> CommitPlan:
        """Take the pending offsets for one commit (one at a time)."""
        if self.in_flight is not None:
            raise ProtocolError("a commit is already in flight; one commit at a time")
        plan = CommitPlan(dict(self.pending), force)
        self.pending = {}
        self.in_flight = plan
        self._began = self.clock()
        return plan

    def succeeded(self, plan: CommitPlan) -> None:
        self._end(plan)
        self.failures = 0
        self.commits += 1
        # the interval runs from the start of a commit: a slow commit is followed at once
        self._last_commit = self._began
        for p, off in plan.offsets.items():
            if p in self.owned:
                self.floor[p] = max(self.floor[p], off)

    def failed(self, plan: CommitPlan, error: BaseException, *, fenced: bool = False) -> Decision:
        """A commit failed: retry later (at-least-once) or exit (see the module docstring)."""
        self._end(plan)
        self.failures += 1
        if fenced:
            return Decision(
                f"fenced ({error!r:.200}): another worker owns partitions "
                f"{sorted(plan.offsets)} now (this one was paused or cut off past its session "
                "timeout); its uncommitted work is discarded, and it exits to rejoin afresh",
                exit_code=EXIT_TEMPFAIL,
                abort=True,
            )
        if self.exactly_once:
            return Decision(
                f"a transaction failed ({error!r:.200}); the open transactions are aborted and "
                "the worker exits: the next owner of its partitions resumes from the last "
                "committed transaction",
                exit_code=EXIT_TEMPFAIL,
                abort=True,
            )
        # at-least-once: keep the offsets (newer ones of a partition supersede them)
        for p, off in plan.offsets.items():
            if p in self.owned:
                self.pending[p] = max(off, self.pending.get(p, off))
        if self.failures >= self.max_attempts:
            return Decision(
                f"{self.failures} checkpoints in a row failed (last: {error!r:.200}); the worker "
                "exits uncommitted: check the broker, then restart it",
                exit_code=EXIT_TEMPFAIL,
            )
        delay = min(self.backoff_s * 2 ** (self.failures - 1), self.backoff_max_s)
        self._retry_at = self.clock() + delay
        return Decision(
            f"checkpoint failed ({error!r:.200}); attempt {self.failures + 1} of "
            f"{self.max_attempts} in {delay:.1f}s",
            retry_in_s=delay,
        )

    def skip_backoff(self) -> None:
        """A forced commit (revocation, shutdown) does not wait for a backoff to run out."""
        self._retry_at = 0.0

    def ready(self) -> bool:
        """No commit in flight and no backoff running: a commit may start."""
        return self.in_flight is None and self.clock() >= self._retry_at

    def lost(self, error: BaseException, *, fenced: bool = False) -> Decision:
        """Exactly-once: sending into a transaction failed (outside a commit)."""
        if fenced:
            return Decision(
                f"fenced ({error!r:.200}): another worker owns a partition of this one now; "
                "its uncommitted work is discarded, and it exits to rejoin afresh",
                exit_code=EXIT_TEMPFAIL,
                abort=True,
            )
        return Decision(
            f"sending outputs into a transaction failed ({error!r:.200}); the open transactions "
            "are aborted and the worker exits (nothing of them becomes visible)",
            exit_code=EXIT_TEMPFAIL,
            abort=True,
        )

    def crashed(self, error: BaseException) -> Decision:
        """The engine raised on a micro-batch: a bug, not bad input; nothing is dead-lettered.

        Its states may hold part of the batch, so nothing processed since the last commit may
        become durable: exactly-once aborts the open transactions, at-least-once commits
        nothing; either way the worker exits and the batch is redone by the next owner.
        """
        return Decision(
            f"the engine failed on a micro-batch ({error!r:.300}); nothing of it is committed "
            "or dead-lettered; the worker exits and the batch is processed again on restart "
            "(report the error if it repeats)",
            exit_code=EXIT_SOFTWARE,
            abort=self.exactly_once,
        )

    def _end(self, plan: CommitPlan) -> None:
        if self.in_flight is not plan:
            raise ProtocolError("ended a commit that is not the one in flight")
        self.in_flight = None
