"""From records to padded tensor batches, per task.

Targets use ``IGNORE`` (-100, ``torch.nn.functional.cross_entropy``'s ignore index) at padded
positions so losses and metrics never count padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from stream_rnn.train.data import Record
from stream_rnn.train.exceptions import DataError
from stream_rnn.train.vocab import LabelSet, Vocab

IGNORE = -100
TaskName = Literal["next-token", "classify", "tag", "seq2seq"]


@dataclass
class Example:
    """One encoded sequence: ``src`` ids, plus what the task predicts."""

    key: str
    src: list[int]
    tgt: list[int] = field(default_factory=list)
    label: int = IGNORE
    tags: list[int] = field(default_factory=list)


def prepare(
    records: list[Record],
    task: TaskName,
    vocab: Vocab,
    labels: LabelSet | None = None,
    *,
    max_len: int | None = None,
) -> list[Example]:
    """Encode ``records`` for ``task``; raises :class:`DataError` naming the offending key."""
    out: list[Example] = []
    for rec in records:
        src = vocab.encode(rec.items(vocab.level))
        if max_len is not None:
            src = src[:max_len]
        if not src:
            raise DataError(f"record {rec.key!r} has no tokens; remove it or give it text/tokens")
        ex = Example(key=rec.key, src=src)
        if task == "next-token":
            # Position t predicts token t+1; the last position predicts the end of the sequence.
            ex.tgt = src[1:] + [vocab.eos_id]
        elif task == "classify":
            if rec.label is None or labels is None:
                raise DataError(f"record {rec.key!r} has no 'label'; task classify needs one")
            ex.label = labels.index(str(rec.label))
        elif task == "tag":
            if rec.tags is None or labels is None:
                raise DataError(f"record {rec.key!r} has no 'tags'; task tag needs one per token")
            tags = list(rec.tags)[: len(src)]
            if len(tags) != len(src):
                raise DataError(
                    f"record {rec.key!r}: {len(rec.tags)} tags for {len(src)} tokens; "
                    "give exactly one tag per token"
                )
            ex.tags = [labels.index(str(t)) for t in tags]
        elif task == "seq2seq":
            if rec.target is None:
                raise DataError(f"record {rec.key!r} has no 'target'; task seq2seq needs one")
            tgt = vocab.encode(rec.target_items(vocab.level))
            ex.tgt = tgt[:max_len] if max_len is not None else tgt
        out.append(ex)
    return out


@dataclass
class Batch:
    """Padded tensors for a group of examples (batch_first)."""

    keys: list[str]
    src: Tensor  # (B, T) token ids, PAD beyond each length
    lengths: Tensor  # (B,) valid source lengths
    targets: Tensor  # (B, T) next-token / tag targets, IGNORE at padding (empty otherwise)
    labels: Tensor  # (B,) class indices (classify)
    dec_in: Tensor  # (B, T2) seq2seq decoder inputs: <bos> + target
    dec_out: Tensor  # (B, T2) seq2seq decoder targets: target + <eos>, IGNORE at padding
    dec_lengths: Tensor  # (B,)

    @property
    def size(self) -> int:
        return int(self.src.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.keys,
            *(t.to(device) for t in (self.src, self.lengths, self.targets, self.labels)),
            *(t.to(device) for t in (self.dec_in, self.dec_out, self.dec_lengths)),
        )


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(examples: list[Example], task: TaskName, vocab: Vocab) -> Batch:
    src = _pad([e.src for e in examples], vocab.pad_id)
    lengths = torch.tensor([len(e.src) for e in examples], dtype=torch.long)
    empty = torch.empty((len(examples), 0), dtype=torch.long)
    targets = empty
    if task == "next-token":
        targets = _pad([e.tgt for e in examples], IGNORE)
    elif task == "tag":
        targets = _pad([e.tags for e in examples], IGNORE)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    dec_in, dec_out, dec_lengths = empty, empty, torch.zeros(len(examples), dtype=torch.long)
    if task == "seq2seq":
        dec_in = _pad([[vocab.bos_id, *e.tgt] for e in examples], vocab.pad_id)
        dec_out = _pad([[*e.tgt, vocab.eos_id] for e in examples], IGNORE)
        dec_lengths = torch.tensor([len(e.tgt) + 1 for e in examples], dtype=torch.long)
    return Batch(
        [e.key for e in examples], src, lengths, targets, labels, dec_in, dec_out, dec_lengths
    )


def make_batches(
    examples: list[Example],
    task: TaskName,
    vocab: Vocab,
    batch_size: int,
    *,
    rng: random.Random | None = None,
) -> list[Batch]:
    """Group examples of similar length (less padding), in shuffled order when ``rng`` is given.

    Bucketing sorts by length inside windows of 50 batches, so batches stay random across
    epochs but padding stays small.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    window = batch_size * 50
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].src))
        groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if rng is not None:
        rng.shuffle(groups)
    return [collate([examples[i] for i in g], task, vocab) for g in groups]
