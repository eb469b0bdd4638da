"""What the engine consumes and produces, independent of Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of the wire-schema modules that import this one
    from torch import Tensor

TOKEN, END, RESET, GENERATE = 0, 1, 2, 3
KIND_NAMES = {TOKEN: "token", END: "end", RESET: "reset", GENERATE: "generate"}
# A chunk's per-token outputs come as one prediction: type -> (the per-token type, its payload
# fields, each of which the chunk prediction carries as a list with one entry per token).
CHUNK_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "next_chunk": ("next", ("next",)),
    "estimate_chunk": ("estimate", ("label", "probs")),
    "tag_chunk": ("tag", ("tag", "prob")),
}
CHUNK_OF = {kind: chunk for chunk, (kind, _) in CHUNK_TYPES.items()}


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

    ``token`` is a vocabulary id (already resolved) for token events, -1 otherwise. A chunk
    (a ``tokens`` message) is one ``TOKEN`` event with ``tokens``, its ids in order, and
    ``token`` -1: it is applied wholly or (a redelivery) not at all, and answered by one
    prediction. ``id`` is the stable id of the source message (``partition:offset`` on Kafka)
    that every prediction it causes carries. ``offset`` >= 0 turns on exactly-once
    application: an event whose offset is not above the key's last applied offset is a
    redelivery and is skipped.
    """

    key: str
    kind: int
    token: int = -1
    id: str = ""
    ts: float | None = None
    gen: GenerateParams | None = None
    partition: int = -1
    offset: int = -1
    tokens: list[int] | None = None


@dataclass(slots=True)
class Rejection:
    """An event the engine refused (e.g. a control event for an unknown key)."""

    event: Event
    reason: str
    detail: str


@dataclass(slots=True, eq=False)
class TokenBlock:
    """Per-token outputs of one batched step, kept as (CPU) tensors until someone reads them.

    Row i of the tensors is the i-th token of ``events`` in order (a chunk's tokens are
    consecutive rows). ``kind`` says what the rows hold:

    * ``"next"``: ``values`` (N, k) top-k probabilities, ``ids`` (N, k) their token ids;
    * ``"tag"``: ``values`` (N,) the best tag's probability, ``ids`` (N,) its label index;
    * ``"estimate"``: ``values`` (N, L) label probabilities, ``ids`` None.

    ``names`` turns ids into strings (the vocabulary's tokens, or the labels). ``counts``: how
    many rows each event has, when some event is a chunk (None: one row per event). The
    stream encoder reads the columns directly; :meth:`to_dicts` builds prediction dicts.
    """

    kind: str
    events: list[Event]
    pos: Tensor  # (N,) each token's position in its key's sequence
    seq: Tensor  # (N,) its key's sequence number
    version: str
    values: Tensor
    ids: Tensor | None
    names: list[str]
    counts: list[int] | None = None

    @property
    def count(self) -> int:
        """Number of predictions: one per event (a chunk's outputs share one)."""
        return len(self.events)

    def payloads(self) -> list[dict[str, Any]]:
        """The per-token payload fields of every row, in row order."""
        values, names = self.values.tolist(), self.names
        if self.kind == "next":
            assert self.ids is not None  # noqa: S101 - next blocks always carry ids
            return [
                {"next": {"tokens": [names[t] for t in i], "probs": v}}
                for i, v in zip(self.ids.tolist(), values, strict=True)
            ]
        if self.kind == "tag":
            assert self.ids is not None  # noqa: S101 - tag blocks always carry ids
            return [
                {"tag": names[i], "prob": v} for i, v in zip(self.ids.tolist(), values, strict=True)
            ]
        out = []
        for v in values:
            best = max(range(len(v)), key=v.__getitem__)
            out.append({"label": names[best], "probs": dict(zip(names, v, strict=True))})
        return out

    def to_dicts(self) -> list[dict[str, Any]]:
        """One prediction dict per event (wire fields but the emit-time ones; ``_ts``)."""
        payloads = self.payloads()
        pos, seq = self.pos.tolist(), self.seq.tolist()
        counts = self.counts or [1] * len(self.events)
        kind, version = self.kind, self.version
        fields = CHUNK_TYPES[CHUNK_OF[kind]][1]
        rows: list[dict[str, Any]] = []
        start = 0
        for ev, n in zip(self.events, counts, strict=True):
            row: dict[str, Any] = {
                "key": ev.key,
                "id": ev.id,
                "seq": seq[start],
                "pos": pos[start],
                "model_version": version,
                "_ts": ev.ts,
            }
            if ev.tokens is None:
                row["type"] = kind
                row.update(payloads[start])
            else:
                row["type"] = CHUNK_OF[kind]
                row["pos_to"] = pos[start + n - 1]
                chunk = payloads[start : start + n]
                for name in fields:
                    row[name] = [p[name] for p in chunk]
            rows.append(row)
            start += n
        return rows


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
