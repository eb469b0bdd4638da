"""Output heads: per-token predictions computed for a whole micro-batch at once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stream_rnn.engine.events import Event, TokenBlock
from stream_rnn.engine.topk import top_k
from stream_rnn.train.vocab import LabelSet, Vocab


class Heads:
    """Turns per-token network outputs into columnar prediction blocks for one task.

    * next-token: ``type "next"`` with the top-k next tokens and probabilities;
    * tag: ``type "tag"`` with the tag and its probability;
    * classify: ``type "estimate"`` (running label distribution) if enabled, else nothing;
    * seq2seq: nothing per token (the translation comes at ``end``).
    """

    def __init__(
        self, task: str, vocab: Vocab, labels: LabelSet, top_k: int, running_estimate: bool
    ) -> None:
        self.task = task
        self.itos = list(vocab.itos)
        self.labels = list(labels.labels)
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
        counts: list[int] | None = None,
    ) -> TokenBlock | None:
        """Per-token outputs of one step as a columnar block (None when the task has none).

        ``rows``: the token of each row of ``out`` when they are not in token order (the few
        per-token results are put back in order, cheaper than the network outputs);
        ``counts``: tokens per event when some event is a chunk."""
        task = self.task
        if task == "seq2seq" or (task == "classify" and not self.running_estimate):
            return None
        probs = torch.softmax(out.float(), dim=-1)
        ids: Tensor | None = None
        if task == "next-token":
            kind, names = "next", self.itos
            values, ids = top_k(probs, min(self.top_k, probs.shape[-1]))
        elif task == "tag":
            kind, names = "tag", self.labels
            values, ids = probs.max(dim=-1)
        else:
            kind, names, values = "estimate", self.labels, probs
        if rows is not None:
            rows = rows.to(values.device)
            values = torch.empty_like(values).index_copy_(0, rows, values)
            ids = None if ids is None else torch.empty_like(ids).index_copy_(0, rows, ids)
        ids = None if ids is None else ids.cpu()
        return TokenBlock(kind, events, pos, seq, version, values.cpu(), ids, names, counts)

    def label(self, logits: Tensor) -> dict[str, Any]:
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "type": "label",
            "label": self.labels[best],
            "probs": dict(zip(self.labels, probs, strict=True)),
        }
