"""Output heads: per-token predictions computed for a whole micro-batch at once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stream_rnn.engine.events import Event
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

    def token_predictions(
        self,
        events: list[Event],
        out: Tensor,
        pos: Tensor,
        seq: Tensor,
        version: str,
        sink: list[dict[str, Any]],
    ) -> None:
        task = self.task
        if task == "seq2seq" or (task == "classify" and not self.running_estimate):
            return
        probs = torch.softmax(out.float(), dim=-1)
        pos_l, seq_l = pos.tolist(), seq.tolist()
        if task == "next-token":
            values, ids = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
            itos = self.itos
            for ev, p, s, row_ids, row_vals in zip(
                events, pos_l, seq_l, ids.tolist(), values.tolist(), strict=True
            ):
                sink.append(
                    {
                        "key": ev.key,
                        "id": ev.id,
                        "seq": s,
                        "pos": p,
                        "model_version": version,
                        "type": "next",
                        "next": {"tokens": [itos[i] for i in row_ids], "probs": row_vals},
                        "_ts": ev.ts,
                    }
                )
        elif task == "tag":
            values, ids = probs.max(dim=-1)
            labels = self.labels
            for ev, p, s, i, v in zip(
                events, pos_l, seq_l, ids.tolist(), values.tolist(), strict=True
            ):
                sink.append(
                    {
                        "key": ev.key,
                        "id": ev.id,
                        "seq": s,
                        "pos": p,
                        "model_version": version,
                        "type": "tag",
                        "tag": labels[i],
                        "prob": v,
                        "_ts": ev.ts,
                    }
                )
        else:
            for ev, p, s, row in zip(events, pos_l, seq_l, probs.tolist(), strict=True):
                best = max(range(len(row)), key=row.__getitem__)
                sink.append(
                    {
                        "key": ev.key,
                        "id": ev.id,
                        "seq": s,
                        "pos": p,
                        "model_version": version,
                        "type": "estimate",
                        "label": self.labels[best],
                        "probs": dict(zip(self.labels, row, strict=True)),
                        "_ts": ev.ts,
                    }
                )

    def label(self, logits: Tensor) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "type": "label",
            "label": self.labels[best],
            "probs": dict(zip(self.labels, probs, strict=True)),
        }
