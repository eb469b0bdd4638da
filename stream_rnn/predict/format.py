"""The prediction line format.

``stream-rnn score`` writes one JSON object per input sequence; the stream side (simulator,
``collect``) writes the very same shape so results can be diffed line by line:

* classify: ``{"key", "model_version", "label", "probs": {label: p, ...}}``
* next-token: ``{"key", "model_version", "next": [{"tokens": [...k], "probs": [...k]}, ...]}`` —
  one entry per input position: the top-k candidates for the token that follows it.
* tag: ``{"key", "model_version", "tags": [...], "tag_probs": [...]}`` (one per token)
* seq2seq: ``{"key", "model_version", "output": str, "output_tokens": [...]}``
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stream_rnn.train.vocab import LabelSet, Vocab

TOP_K = 5


def topk_entry(probs: Tensor, vocab: Vocab, k: int = TOP_K) -> dict[str, Any]:
    """Top-k of one probability vector as ``{"tokens": [...], "probs": [...]}``."""
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return {"tokens": vocab.decode(ids.tolist()), "probs": [float(v) for v in values.tolist()]}


def next_token_line(
    key: str, version: str, logits: Tensor, vocab: Vocab, k: int = TOP_K
) -> dict[str, Any]:
    """``logits`` (T, V): the outputs after each of the sequence's T tokens."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    entries = [
        {"tokens": vocab.decode(row_ids), "probs": row_vals}
        for row_ids, row_vals in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return {"key": key, "model_version": version, "next": entries}


def classify_line(key: str, version: str, logits: Tensor, labels: LabelSet) -> dict[str, Any]:
    """``logits`` (L,): label logits after the sequence's last token."""
    probs = torch.softmax(logits.float(), dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return {
        "key": key,
        "model_version": version,
        "label": labels.labels[best],
        "probs": {label: float(p) for label, p in zip(labels.labels, probs, strict=True)},
    }


def tag_line(key: str, version: str, logits: Tensor, labels: LabelSet) -> dict[str, Any]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.max(dim=-1)
    return {
        "key": key,
        "model_version": version,
        "tags": [labels.labels[i] for i in ids.tolist()],
        "tag_probs": [float(v) for v in values.tolist()],
    }


def seq2seq_line(key: str, version: str, ids: list[int], vocab: Vocab) -> dict[str, Any]:
    return {
        "key": key,
        "model_version": version,
        "output": vocab.detok(ids),
        "output_tokens": vocab.decode(ids),
    }
