"""Output heads: per-token predictions computed for a whole micro-batch at once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stream_rnn.engine.events import Event
from stream_rnn.engine.topk import top_k
from stream_rnn.train.vocab import LabelSet, Vocab


class Heads:
    """Turns per-token network outputs into prediction dicts for one task.

    * next-token: ``type "next"`` with the top-k next tokens and probabilities;
    * tag: ``type "tag"`` with the tag and its probability;
    * classify: ``type "estimate"`` (running label distribution) if enabled, else nothing;
    * seq2seq: nothing per token (the translation comes at ``end``).
    """

    def __init__(
        self, task: str, vocab: Vocab, labels: LabelSet, top_k: int, running_estimate: bool
    ) -> None:
        self.task = task
        self.itos = vocab.itos
        self.labels = labels.labels
        self.top_k = top_k
        self.running_estimate = running_estimate

    def token_block(
        self,
        events: list[Event],
        out: Tensor,
        pos: Tensor,
        seq: Tensor,
        version: str,
        rows: Tensor | None = None,
    ) -> _Block | None:
        """Per-token outputs of one step as a columnar block (None when the task has none).

        ``rows``: the event of each row of ``out`` when they are not in event order (the few
        per-token results are put back in order, cheaper than the network outputs)."""
        task = self.task
        if task == "seq2seq" or (task == "classify" and not self.running_estimate):
            return None
        probs = torch.softmax(out.float(), dim=-1)
        ids: Tensor | None = None
        if task == "next-token":
            kind = "next"
            values, ids = top_k(probs, min(self.top_k, probs.shape[-1]))
        elif task == "tag":
            kind = "tag"
            values, ids = probs.max(dim=-1)
        else:
            kind, values = "estimate", probs
        if rows is not None:
            rows = rows.to(values.device)
            values = torch.empty_like(values).index_copy_(0, rows, values)
            ids = None if ids is None else torch.empty_like(ids).index_copy_(0, rows, ids)
        ids = None if ids is None else ids.cpu()
        return _Block(self, kind, events, pos, seq, version, values.cpu(), ids)

    def label(self, logits: Tensor) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "type": "label",
            "label": self.labels[best],
            "probs": dict(zip(self.labels, probs, strict=True)),
        }


class _Block:
    """Columnar per-token predictions; :meth:`to_dicts` builds the wire-format dicts."""

    __slots__ = ("heads", "kind", "events", "pos", "seq", "version", "values", "ids", "count")

    def __init__(
        self,
        heads: Heads,
        kind: str,
        events: list[Event],
        pos: Tensor,
        seq: Tensor,
        version: str,
        values: Tensor,
        ids: Tensor | None,
    ) -> None:
        self.heads, self.kind, self.events = heads, kind, events
        self.pos, self.seq, self.version = pos, seq, version
        self.values, self.ids = values, ids
        self.count = len(events)

    def to_dicts(self) -> list[dict[str, Any]]:
        kind, version = self.kind, self.version
        rows: list[dict[str, Any]] = []
        pos_l, seq_l, values = self.pos.tolist(), self.seq.tolist(), self.values.tolist()
        ids = self.ids.tolist() if self.ids is not None else [None] * self.count
        itos, labels = self.heads.itos, self.heads.labels
        for ev, p, s, v, i in zip(self.events, pos_l, seq_l, values, ids, strict=True):
            row: dict[str, Any] = {
                "key": ev.key,
                "id": ev.id,
                "seq": s,
                "pos": p,
                "model_version": version,
                "type": kind,
                "_ts": ev.ts,
            }
            if kind == "next":
                row["next"] = {"tokens": [itos[t] for t in i], "probs": v}
            elif kind == "tag":
                row["tag"] = labels[i]
                row["prob"] = v
            else:
                best = max(range(len(v)), key=v.__getitem__)
                row["label"] = labels[best]
                row["probs"] = dict(zip(labels, v, strict=True))
            rows.append(row)
        return rows
