"""The worker's per-batch path in process: per-token events against ``tokens`` chunks.

`simulations.chunk_bench.run_mode`: ``Adapter.process`` (decode + validate, engine step,
encode) on micro-batches of 1,024 records, GRU 2x128, 10,000 resident keys, one torch thread.
The reference of the chunk row is the per-token row of the same run.
"""

from __future__ import annotations

import orjson
import torch

from simulations.bench.results import Section
from simulations.bench.runner import Context
from simulations.chunk_bench import _OFFSETS, BATCH, build, run_mode
from stream_rnn.stream.adapter import Adapter, RawRecord

FULL = {"batches": 20, "keys": 10_000, "chunk": 16}
QUICK = {"batches": 2, "keys": 1_000, "chunk": 16}


def run(ctx: Context, section: Section) -> None:
    cfg = QUICK if ctx.quick else FULL
    section.config = {**cfg, "batch": BATCH, "model": "GRU 2x128", "torch_threads": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs it
    try:
        engine, vocab = build(256, 128, 2, cfg["keys"])
        first = orjson.dumps({"v": 1, "type": "token", "token": vocab.itos[4]})
        # offsets from chunk_bench's counter, which only grows: a token below a key's applied
        # offset would be skipped as a redelivery
        for start in range(0, cfg["keys"], BATCH):  # admit every key once
            names = [f"user-{i}".encode() for i in range(start, min(start + BATCH, cfg["keys"]))]
            warm = [RawRecord(k, first, "t", 0, next(_OFFSETS)) for k in names]
            Adapter().process(warm, engine)
        per_token = run_mode(engine, vocab, cfg["keys"], 1, cfg["batches"], False)
        chunks = run_mode(engine, vocab, cfg["keys"], cfg["chunk"], cfg["batches"], False)
    finally:
        torch.set_num_threads(threads)
    section.data = {"per_token": per_token, "chunks": chunks}
    section.add("chunk.tokens", f"Adapter.process, chunks of {cfg['chunk']} per record",
                chunks["tokens_s"], "tokens/s", ref="same, one token per record",
                ref_value=per_token["tokens_s"])  # fmt: skip
