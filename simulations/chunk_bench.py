"""In-process benchmark of the worker's per-batch path: per-token events vs ``tokens`` chunks.

``Adapter.process`` (decode + validate, engine step, encode predictions) on micro-batches of
1024 Kafka records, no broker: every record a ``token`` event, or every record a ``tokens``
chunk of ``--chunk`` tokens. Next-token GRU 2x128, vocabulary 256, 10k keys (issue 10's
benchmark model), keys drawn at random, all resident (a warm-up pass admits them).

Printed per mode: records/s and tokens/s of the whole path (means), its split into decode,
engine and encode, and the median and worst batch. Garbage collection waits during a batch as
in ``Adapter.process``; ``--gc-during-batch`` lets it run (what it costs), ``--gc-freeze``
moves everything allocated at set-up out of the collector's reach. A second table compares prediction encoding on the same engine results: the
columnar encoder (`stream_rnn.stream.encoder`) against the former path, one dict per token
(``BatchResult.predictions``) finalised and encoded one by one.

Run: ``.venv/bin/python simulations/chunk_bench.py [--batches 20] [--chunk 16]``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import statistics
import time
from collections.abc import Callable

import orjson
import torch

from stream_rnn.engine.engine import Engine
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.stream.codec import encode_prediction
from stream_rnn.stream.encoder import PredictionEncoder, finalise
from stream_rnn.train.vocab import Vocab

BATCH = 1024
_OFFSETS = itertools.count()  # source offsets only grow: nothing is taken for a redelivery


def build(vocab_size: int, hidden: int, layers: int, keys: int) -> tuple[Engine, Vocab]:
    torch.manual_seed(0)
    vocab = Vocab.from_tokens([f"w{i}" for i in range(vocab_size - 4)], "token")
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=len(vocab), embed_dim=64,
                      hidden_size=hidden, num_layers=layers)  # fmt: skip
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=vocab.to_dict(), weights_sha256="0" * 64, version="b"
    )
    return Engine(RecurrentModel(cfg).eval(), manifest, capacity=keys), vocab


def batches(vocab: Vocab, keys: int, chunk: int, n: int, seed: int) -> list[list[RawRecord]]:
    """``n`` batches of BATCH records; chunk 1: token events, else tokens events."""
    rng = random.Random(seed)
    words = list(vocab.itos[4:])
    out = []
    for _ in range(n):
        batch = []
        for _ in range(BATCH):
            offset = next(_OFFSETS)
            key = f"user-{rng.randrange(keys)}".encode()
            ts = 1.7e9 + offset * 1e-4
            if chunk == 1:
                event = {"v": 1, "type": "token", "token": rng.choice(words), "ts": ts}
            else:
                tokens = [rng.choice(words) for _ in range(chunk)]
                event = {"v": 1, "type": "tokens", "tokens": tokens, "ts": ts}
            batch.append(RawRecord(key, orjson.dumps(event), "t", 0, offset))
        out.append(batch)
    return out


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes with collections paused, as in ``Adapter.process``."""
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def run_mode(
    engine: Engine, vocab: Vocab, keys: int, chunk: int, n: int, gc_during_batch: bool
) -> dict[str, float]:
    adapter = Adapter(max_tokens=max(chunk, 1))
    data = batches(vocab, keys, chunk, n + 2, seed=chunk)
    for batch in data[:2]:  # warm-up: allocator, kernels
        adapter.process(batch, engine)
    parts: dict[str, list[float]] = {"total": [], "decode": [], "engine": [], "encode": []}
    for batch in data[2:]:
        pause = gc.isenabled() and not gc_during_batch
        if pause:  # as Adapter.process does
            gc.disable()
        t0 = time.perf_counter()
        decoded = adapter.decode(batch)
        t1 = time.perf_counter()
        result = engine.process(decoded.events)
        t2 = time.perf_counter()
        out = adapter.finish(decoded, result)
        t3 = time.perf_counter()
        if pause:
            gc.enable()
        assert not out.dead_letters and len(out.predictions) == BATCH
        parts["decode"].append(t1 - t0)
        parts["engine"].append(t2 - t1)
        parts["encode"].append(t3 - t2)
        parts["total"].append(t3 - t0)
    # means, not medians: a full garbage collection now and then is part of the cost
    mean = {k: statistics.fmean(v) for k, v in parts.items()}
    return {
        "records_s": BATCH / mean["total"],
        "tokens_s": BATCH * chunk / mean["total"],
        "p50_ms": statistics.median(parts["total"]) * 1e3,
        "max_ms": max(parts["total"]) * 1e3,
        **{f"{k}_us_per_record": v / BATCH * 1e6 for k, v in mean.items()},
    }


def encode_compare(engine: Engine, vocab: Vocab, keys: int, chunk: int) -> tuple[float, float]:
    """Median seconds to encode one batch's predictions: columnar vs a dict per token."""
    adapter = Adapter(max_tokens=chunk)
    encoder = PredictionEncoder()
    columnar, dicts = [], []
    for batch in batches(vocab, keys, chunk, 7, seed=100 + chunk):
        decoded = adapter.decode(batch)
        result = engine.process(decoded.events)
        columnar.append(timed(lambda r=result: encoder.encode(r, 1.7e9)))  # type: ignore[misc]
        dicts.append(
            timed(
                lambda r=result: [  # type: ignore[misc]
                    (p["key"].encode(), encode_prediction(finalise(p, 1.7e9)))
                    for p in r.predictions
                ]
            )
        )
    return statistics.fmean(columnar[1:]), statistics.fmean(dicts[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: more would spin against other processes)")  # fmt: skip
    parser.add_argument("--gc-during-batch", action="store_true",
                        help="let collections run inside a batch (Adapter.process pauses them)")  # fmt: skip
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after set-up: full collections skip the model and pool")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine, vocab = build(args.vocab, args.hidden, args.layers, args.keys)
    first = orjson.dumps({"v": 1, "type": "token", "token": vocab.itos[4]})
    for start in range(0, args.keys, BATCH):  # admit every key once
        names = [f"user-{i}".encode() for i in range(start, min(start + BATCH, args.keys))]
        warm = [RawRecord(k, first, "t", 0, next(_OFFSETS)) for k in names]
        Adapter().process(warm, engine)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    print(f"GRU {args.layers}x{args.hidden}, vocab {args.vocab}, {args.keys} keys, "
          f"batches of {BATCH} records, torch threads {torch.get_num_threads()}, "
          f"gc.freeze {'on' if args.gc_freeze else 'off'}, collections inside a batch "
          f"{'on' if args.gc_during_batch else 'off'}")  # fmt: skip
    print(f"{'mode':<12}{'records/s':>11}{'tokens/s':>11}   µs per record (mean): total "
          "decode engine encode   batch p50 / max ms")  # fmt: skip
    rows = {}
    for chunk in (1, args.chunk):
        r = rows[chunk] = run_mode(
            engine, vocab, args.keys, chunk, args.batches, args.gc_during_batch
        )
        name = "per-token" if chunk == 1 else f"chunks of {chunk}"
        print(f"{name:<12}{r['records_s']:>11,.0f}{r['tokens_s']:>11,.0f}   "
              f"{r['total_us_per_record']:>16.1f} {r['decode_us_per_record']:>6.1f} "
              f"{r['engine_us_per_record']:>6.1f} {r['encode_us_per_record']:>6.1f}"
              f"   {r['p50_ms']:>8.1f} / {r['max_ms']:.1f}")  # fmt: skip
    ratio = rows[args.chunk]["tokens_s"] / rows[1]["tokens_s"]
    print(f"chunks of {args.chunk}: {ratio:.1f}x the tokens/s of per-token events")
    print("\nencoding one batch's predictions (mean):")
    for chunk in (1, args.chunk):
        col, old = encode_compare(engine, vocab, args.keys, chunk)
        name = "per-token" if chunk == 1 else f"chunks of {chunk}"
        print(f"  {name:<12} columnar {col * 1e3:6.2f} ms   dict per token {old * 1e3:6.2f} ms"
              f"   ({old / col:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
