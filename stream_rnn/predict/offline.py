"""Offline scoring (``stream-rnn score``): full-sequence passes over recorded sequences."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from stream_rnn.model.generate import translate
from stream_rnn.model.network import RecurrentModel
from stream_rnn.predict.format import (
    TOP_K,
    classify_line,
    next_token_line,
    seq2seq_line,
    tag_line,
)
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import DataError
from stream_rnn.train.vocab import LabelSet, Vocab


def _pad(
    rows: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return out.to(device), lengths.to(device)


@torch.inference_mode()
def score_records(
    model: RecurrentModel,
    manifest: Manifest,
    records: Sequence[Record],
    *,
    batch_size: int = 64,
    top_k: int = TOP_K,
    max_output_len: int = 200,
) -> Iterator[dict[str, Any]]:
    """Yield one prediction line per record, in input order (see :mod:`stream_rnn.predict.format`).

    Example::

        model, manifest = load_checkpoint("runs/lang")
        for line in score_records(model, manifest, read_records("valid.jsonl")):
            print(line["key"], line["label"])
    """
    model.eval()
    vocab = Vocab.from_dict(manifest.vocab)
    task = model.config.task
    device = model.embedding.weight.device
    version = manifest.version
    label_set = LabelSet.from_dict({"labels": manifest.labels or []})
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        rows = [vocab.encode(r.items(vocab.level)) for r in chunk]
        for rec, row in zip(chunk, rows, strict=True):
            if not row:
                raise DataError(f"record {rec.key!r} has no tokens; nothing to score")
        src, lengths = _pad(rows, vocab.pad_id, device)
        if task == "classify":
            logits = model.classify(src, lengths)
            for i, rec in enumerate(chunk):
                yield classify_line(rec.key, version, logits[i], label_set)
        elif task in ("next-token", "tag"):
            out, _ = model(src, None, lengths)
            for i, rec in enumerate(chunk):
                n = len(rows[i])
                if task == "tag":
                    yield tag_line(rec.key, version, out[i, :n], label_set)
                else:
                    yield next_token_line(rec.key, version, out[i, :n], vocab, top_k)
        else:
            decoded = translate(
                model,
                model.encode(src, lengths),
                bos_id=vocab.bos_id,
                eos_id=vocab.eos_id,
                max_len=max_output_len,
            )
            for rec, ids in zip(chunk, decoded, strict=True):
                yield seq2seq_line(rec.key, version, ids, vocab)
