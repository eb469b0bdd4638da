"""What the engine consumes and produces, independent of Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    it causes carries. ``offset`` >= 0 turns on exactly-once application: an event whose offset
    is not above the key's last applied offset is a redelivery and is skipped.
    """

    key: str
    kind: int
    token: int = -1
    id: str = ""
    ts: float | None = None
    gen: GenerateParams | None = None
    partition: int = -1
    offset: int = -1


@dataclass(slots=True)
class Rejection:
    """An event the engine refused (e.g. a control event for an unknown key)."""

    event: Event
    reason: str
    detail: str


class TokenBlock(Protocol):
    """Per-token outputs of one batched step, kept as tensors until someone reads them."""

    count: int

    def to_dicts(self) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class BatchResult:
    """Predictions of a micro-batch, in emission order, and the events it refused.

    Token outputs stay columnar (tensors) in ``items`` until :attr:`predictions` is read, so
    the engine's hot path never builds per-token Python objects; control outputs are dicts.
    Prediction dicts have the wire fields except the emit-time ones; ``_ts`` carries the
    source event's producer timestamp for latency.
    """

    items: list[TokenBlock | dict[str, Any]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    tokens: int = 0
    skipped: int = 0  # redelivered events already applied to their key's state
    _predictions: list[dict[str, Any]] | None = None

    @property
    def count(self) -> int:
        """Number of predictions, without materialising them."""
        return sum(1 if isinstance(i, dict) else i.count for i in self.items)

    @property
    def predictions(self) -> list[dict[str, Any]]:
        if self._predictions is None:
            out: list[dict[str, Any]] = []
            for item in self.items:
                if isinstance(item, dict):
                    out.append(item)
                else:
                    out.extend(item.to_dicts())
            self._predictions = out
        return self._predictions
