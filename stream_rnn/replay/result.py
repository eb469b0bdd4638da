"""What a replay run observed, the same shape for both modes (in process and through Kafka).

Times are seconds after the replay's start. ``sent_at[i]`` is when message i was due: its
scheduled time, or under ``--max`` the moment it was handed over; an output's latency is
``at`` minus the ``sent_at`` of the message that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

OutputKind = Literal["prediction", "dead_letter"]
FaultStatus = Literal["done", "failed", "skipped"]


@dataclass(slots=True)
class Output:
    """One prediction or dead letter, matched to the message (schedule index) that caused it."""

    index: int
    at: float
    kind: OutputKind
    body: dict[str, Any]


@dataclass
class ReplayResult:
    """Everything a run saw; `stream_rnn.replay.analysis.analyse` turns it into a report.

    ``outputs`` holds the first copy of each ``(id, type)`` (``duplicates`` counts further
    copies); ``foreign``: outputs whose id is no message of this replay; ``mismatched_keys``:
    outputs whose key is not their message's. ``batches``: ``(at, tokens)`` per engine
    micro-batch (in process only). ``pool``: the state pool's counters (in process only).
    ``sent``: messages handed over; ``send_failed``: messages the broker did not take.
    ``faults``: what each injected fault (``--fault``) did, in the order they were given.
    """

    mode: Literal["inproc", "kafka"]
    timing: str
    sent_at: list[float]
    outputs: list[Output] = field(default_factory=list)
    duplicates: int = 0
    foreign: int = 0
    mismatched_keys: int = 0
    elapsed_s: float = 0.0
    sent: int = 0
    send_failed: int = 0
    batches: list[tuple[float, int]] = field(default_factory=list)
    pool: dict[str, int] | None = None
    versions_served: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    wall0: float = 0.0  # epoch seconds at the replay's start (its clock's 0)


@dataclass
class FaultRecord:
    """One fault of the plan and what became of it.

    ``at`` / ``done_at``: when it started and when its effect was complete (e.g. the survivors
    owned every partition again), on the replay's clock; ``wall``: the start in epoch
    seconds. ``markers``: ``(at, label)`` moments for the plots. A fault that never started
    (the replay ended first, or an earlier fault failed) is ``skipped`` with ``at`` None.
    """

    spec: str
    kind: str
    order: int
    status: FaultStatus = "skipped"
    at: float | None = None
    wall: float | None = None
    done_at: float | None = None
    detail: str = ""
    markers: list[tuple[float, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``faults.json`` of the report)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "status": self.status,
            "at": self.at,
            "wall": self.wall,
            "done_at": self.done_at,
            "detail": self.detail,
            "markers": [[at, label] for at, label in self.markers],
        }


class Progress(Protocol):
    """What a runner reports while it runs (the CLI draws rich progress bars from it)."""

    def start(self, total: int, expected: int) -> None:
        """``total`` messages to send, ``expected`` of them will be answered."""

    def update(self, sent: int, answered: int) -> None: ...

    def close(self) -> None: ...


class FaultHooks(Protocol):
    """What a Kafka replay tells a fault injector, and asks it (`stream_rnn.replay.injector`)."""

    def begin(self, t0: float, total: int) -> None:
        """The replay started at ``t0`` (``time.monotonic()``) with ``total`` messages."""

    def sent(self, count: int) -> None:
        """``count`` messages were handed over so far (called after every message)."""

    def busy(self) -> bool:
        """A fault is under way or due: the replay waits for it before it ends."""
        ...


class NoProgress:
    """A `Progress` that shows nothing (tests, library use)."""

    def start(self, total: int, expected: int) -> None:
        pass

    def update(self, sent: int, answered: int) -> None:
        pass

    def close(self) -> None:
        pass


Clock = Callable[[], float]
