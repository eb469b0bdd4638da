"""``stream-rnn simulate``: replay recorded sequences through the engine, in process.

All sequences' tokens are interleaved at random (seeded), as a live stream would deliver
them, fed in micro-batches with an ``end`` after each sequence; the result has exactly the
line format of ``stream-rnn score`` and must agree with it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from stream_rnn.engine.assemble import assemble
from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import END, TOKEN, Event
from stream_rnn.train.data import Record


def interleaved_events(engine: Engine, records: Sequence[Record], seed: int) -> list[Event]:
    """Token events (+ ``end``) of every record, randomly interleaved, per-key order kept.

    Sequences sharing a key run one after the other (a key's next sequence starts after its
    previous ``end``). Event ids are ``0:<index>`` as if everything sat in one partition.
    """
    vocab = engine.vocab
    queues: dict[str, list[list[Event]]] = {}
    for rec in records:
        ids = vocab.encode(rec.items(vocab.level))
        evs = [Event(rec.key, TOKEN, token=t) for t in ids]
        evs.append(Event(rec.key, END))
        queues.setdefault(rec.key, []).append(evs)
    streams = {key: [e for seq in seqs for e in seq] for key, seqs in queues.items()}
    rng = random.Random(seed)  # noqa: S311 - simulation order, not secrets
    cursors = {key: 0 for key in streams}
    live = list(streams)
    out: list[Event] = []
    while live:
        i = rng.randrange(len(live))
        key = live[i]
        ev = streams[key][cursors[key]]
        cursors[key] += 1
        ev.id = f"0:{len(out)}"
        out.append(ev)
        if cursors[key] == len(streams[key]):
            live[i] = live[-1]
            live.pop()
    return out


def simulate(
    engine: Engine, records: Sequence[Record], *, batch: int = 1024, seed: int = 0
) -> list[dict[str, Any]]:
    """Score lines (``stream-rnn score`` format) for ``records``, in input order."""
    events = interleaved_events(engine, records, seed)
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(events), batch):
        result = engine.process(events[start : start + batch])
        if result.rejections:
            first = result.rejections[0]
            raise ValueError(f"simulation rejected an event: {first.reason}: {first.detail}")
        predictions.extend(result.predictions)
    lines = assemble(predictions, engine.model.config.task)
    ordered: list[dict[str, Any]] = []
    seq_of: dict[str, int] = {}
    for rec in records:
        seq = seq_of.get(rec.key, 0)
        seq_of[rec.key] = seq + 1
        line = lines.get((rec.key, seq))
        if line is None:
            raise ValueError(f"no prediction assembled for sequence {seq} of key {rec.key!r}")
        ordered.append(line)
    return ordered
