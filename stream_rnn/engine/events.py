"""What the engine consumes and produces, independent of Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TOKEN, END, RESET, GENERATE = 0, 1, 2, 3
KIND_NAMES = {TOKEN: "token", END: "end", RESET: "reset", GENERATE: "generate"}


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """Sampling parameters of a ``generate`` control event."""

    n: int
    temperature: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seed: int | None = None


@dataclass(slots=True)
class Event:
    """One decoded, validated input event for a key.

    ``token`` is a vocabulary id (already resolved) for token events, -1 otherwise. ``id`` is
    the stable id of the source message (``partition:offset`` on Kafka) that every prediction
    it causes carries.
    """

    key: str
    kind: int
    token: int = -1
    id: str = ""
    ts: float | None = None
    gen: GenerateParams | None = None


@dataclass(slots=True)
class Rejection:
    """An event the engine refused (e.g. a control event for an unknown key)."""

    event: Event
    reason: str
    detail: str


@dataclass(slots=True)
class BatchResult:
    """Predictions (dicts in the wire format, minus emit-time fields) and rejections."""

    predictions: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    tokens: int = 0
