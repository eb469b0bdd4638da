"""Engine results to prediction messages in bulk: columnar tensors in, wire bytes out.

The engine leaves per-token outputs as columns (:class:`~stream_rnn.engine.events.TokenBlock`:
top-k ids and probabilities, positions, sequence numbers). Here each column becomes a Python
list in one call (``Tensor.tolist``, token ids to strings through one numpy object-array
take), the prediction structs of :mod:`stream_rnn.stream.messages` are built positionally by
``map`` over those lists (no dict per token, no Python loop body per single-token message), and
each struct is encoded by msgspec. A chunk event's outputs go into one ``*_chunk`` prediction,
its per-token lists sliced from the same columns. Control predictions (end, reset, generate,
label) are few and stay dicts.

Example::

    encoder = PredictionEncoder()
    keys, values, parts = encoder.encode(engine.process(events), now=time.time())
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any

import msgspec
import numpy as np

from stream_rnn.engine.events import BatchResult, TokenBlock
from stream_rnn.stream.messages import (
    EstimateChunkPrediction,
    EstimatePrediction,
    NextChunkPrediction,
    NextPrediction,
    TagChunkPrediction,
    TagPrediction,
    TopK,
)

# per-token kind -> (struct of a single-token event's prediction, struct of a chunk's)
_STRUCTS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "next": (NextPrediction, NextChunkPrediction),
    "tag": (TagPrediction, TagChunkPrediction),
    "estimate": (EstimatePrediction, EstimateChunkPrediction),
}


class PredictionEncoder:
    """Encodes a micro-batch's predictions: ``(Kafka keys, values, source partitions)``.

    A prediction's source partition is its event's (``Event.partition``): under exactly-once
    it goes into that partition's transaction.
    """

    def __init__(self) -> None:
        self._encode = msgspec.json.Encoder().encode
        # names list of the heads that made a block -> the same names as a numpy object array
        # (ids -> strings in one take); rebuilt when a model swap brings new heads
        self._names: tuple[list[str], np.ndarray] | None = None
        # what the last `encode` produced, for the sensor: predictions by wire type, and the
        # latency of every one whose event carried a producer timestamp
        self.types: Counter[str] = Counter()
        self.latencies: list[float] = []

    def encode(self, result: BatchResult, now: float) -> tuple[list[bytes], list[bytes], list[int]]:
        """Every prediction of ``result`` in emission order, with emit time ``now``."""
        keys: list[bytes] = []
        values: list[bytes] = []
        parts: list[int] = []
        self.types = types = Counter[str]()
        self.latencies = []
        for item in result.items:
            if isinstance(item, TokenBlock):
                block_keys, block_values = self._block(item, now)
                keys += block_keys
                values += block_values
                parts += [e.partition for e in item.events]
                chunks = (
                    0 if item.counts is None else sum(e.tokens is not None for e in item.events)
                )
                types[item.kind] += len(block_values) - chunks
                if chunks:
                    types[f"{item.kind}_chunk"] += chunks
            else:
                keys.append(item["key"].encode())
                pred = finalise(item, now)
                values.append(self._encode(pred))
                parts.append(int(item["id"].partition(":")[0] or -1))
                types[str(pred.get("type"))] += 1
                if pred["latency_s"] is not None:
                    self.latencies.append(pred["latency_s"])
        return keys, values, parts

    def _block(self, block: TokenBlock, now: float) -> tuple[list[bytes], list[bytes]]:
        events = block.events
        keys = [e.key for e in events]
        ids = [e.id for e in events]
        latency = [None if e.ts is None else now - e.ts for e in events]
        self.latencies += [x for x in latency if x is not None]
        pos, seq = block.pos.tolist(), block.seq.tolist()
        columns = self._columns(block)
        single, chunk = _STRUCTS[block.kind]
        version = block.version
        if block.counts is None:  # one token per event: one struct per row, built by map
            structs: Iterable[Any] = map(
                single, repeat(1), keys, ids, seq, pos, repeat(version), latency, repeat(now),
                *columns,
            )  # fmt: skip
        else:  # some event is a chunk: rows a .. a + n - 1 make its one prediction
            structs = []
            a = 0
            for e, key, ident, lat, n in zip(events, keys, ids, latency, block.counts, strict=True):
                head = (1, key, ident, seq[a], pos[a], version, lat, now)
                if e.tokens is None:
                    structs.append(single(*head, *(c[a] for c in columns)))
                else:
                    last = pos[a + n - 1]
                    structs.append(chunk(*head, last, *(c[a : a + n] for c in columns)))
                a += n
        return list(map(str.encode, keys)), list(map(self._encode, structs))

    def _columns(self, block: TokenBlock) -> list[list[Any]]:
        """The payload fields of every row, one list per field (per-token, in row order)."""
        names = self._names_array(block.names)
        if block.kind == "next":
            assert block.ids is not None  # noqa: S101 - next blocks always carry ids
            tokens = names.take(block.ids.numpy()).tolist()
            return [list(map(TopK, tokens, block.values.tolist()))]
        if block.kind == "tag":
            assert block.ids is not None  # noqa: S101 - tag blocks always carry ids
            return [names.take(block.ids.numpy()).tolist(), block.values.tolist()]
        rows = block.values.tolist()
        best = names.take(block.values.argmax(-1).numpy()).tolist()
        return [best, list(map(dict, map(zip, repeat(block.names), rows)))]

    def _names_array(self, names: list[str]) -> np.ndarray:
        if self._names is None or self._names[0] is not names:
            array = np.empty(len(names), dtype=object)
            array[:] = names
            self._names = (names, array)
        return self._names[1]


def finalise(pred: dict[str, Any], now: float) -> dict[str, Any]:
    """Turn an engine prediction dict into its wire form, in place: latency, emit time, version.

    The engine leaves the producer's timestamp in ``"_ts"``; it becomes ``latency_s``.

    >>> finalise({"key": "k", "_ts": 9.5}, now=10.0)
    {'key': 'k', 'latency_s': 0.5, 'ts': 10.0, 'v': 1}
    """
    sent = pred.pop("_ts", None)
    pred["latency_s"] = None if sent is None else now - sent
    pred["ts"] = now
    pred["v"] = 1
    return pred
