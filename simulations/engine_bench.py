"""Engine throughput against a naive loop and a dense ceiling, in one process.

Setup (issue 3, section 6): GRU 2 layers x 128, vocabulary 256, 10,000 active keys, tokens
spread at random over the keys, micro-batches of 1,024 tokens, CPU.

* engine  — ``Engine.process``: grouping, one indexed read of the states, one batched step,
            one indexed write, top-5 next-token head (tensors; turning them into wire dicts and
            JSON is the worker's encoding step, measured end to end through the broker);
* naive   — one event at a time: batch 1, states in a dict, the same top-5 head;
* ceiling — the same number of tokens through the same network (embedding, GRU, decoder,
            softmax, top-5) as dense (1024, 1) batches, with no bookkeeping at all.

Run: ``.venv/bin/python simulations/engine_bench.py [--tokens N] [--device cpu|cuda]``;
`measure` is the same run as a function (``python -m simulations.bench --only engine``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.events import TOKEN, Event
from stream_rnn.engine.topk import top_k
from stream_rnn.model import ModelConfig, RecurrentModel, State
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import Vocab


def build(
    device: str, layers: int, hidden: int, vocab_size: int
) -> tuple[RecurrentModel, Manifest]:
    torch.manual_seed(0)
    vocab = Vocab.from_tokens([f"t{i}" for i in range(vocab_size - 4)], "token")
    cfg = ModelConfig(
        task="next-token",
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=64,
        hidden_size=hidden,
        num_layers=layers,
    )
    model = RecurrentModel(cfg).to(device).eval()
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=vocab.to_dict(), weights_sha256="0", version="m-bench"
    )
    return model, manifest


def run_engine(
    model: RecurrentModel,
    manifest: Manifest,
    events: list[Event],
    batch: int,
    keys: int,
    *,
    steady: bool = False,
) -> float:
    """Tokens/s of `Engine.process` over ``events`` in micro-batches of ``batch``.

    ``steady``: one untimed pass over all the events first, so that every key is resident
    when the timed pass starts (a worker that has run for a while); otherwise only one batch
    warms up and the timed pass admits each key as it first appears (cold: with 10,000 keys
    and 1,024-token batches, three batches in four admit some key).
    """
    engine = Engine(model, manifest, capacity=keys)
    for i in range(0, len(events) if steady else batch, batch):
        engine.process(events[i : i + batch])  # warm-up (allocations, first kernels, keys)
    started = time.perf_counter()
    produced = 0
    for i in range(0, len(events), batch):
        produced += engine.process(events[i : i + batch]).count
    elapsed = time.perf_counter() - started
    assert produced == len(events)
    return len(events) / elapsed


@torch.inference_mode()
def run_naive(model: RecurrentModel, manifest: Manifest, events: list[Event]) -> float:
    device = model.embedding.weight.device
    states: dict[str, State] = {}
    zero = model.init_state(1)
    out_sink = []
    started = time.perf_counter()
    for ev in events:
        state = states.get(ev.key, zero)
        out, state = model.step(torch.tensor([[ev.token]], device=device), state)
        states[ev.key] = state
        values, ids = top_k(torch.softmax(out[0, 0], -1), 5)
        out_sink.append((ev, values, ids))
    return len(events) / (time.perf_counter() - started)


@torch.inference_mode()
def run_ceiling(model: RecurrentModel, n_tokens: int, batch: int) -> float:
    device = model.embedding.weight.device
    tokens = torch.randint(4, model.config.vocab_size, (batch, 1), device=device)
    state = model.init_state(batch)
    model.step(tokens, state)
    started = time.perf_counter()
    for _ in range(n_tokens // batch):
        out, state = model.step(tokens, state)
        values, ids = top_k(torch.softmax(out[:, 0], -1), 5)
        ids.cpu(), values.cpu()
    return (n_tokens // batch) * batch / (time.perf_counter() - started)


def make_events(n: int, keys: int, vocab: int, seed: int = 0) -> list[Event]:
    """``n`` token events spread at random over ``keys`` keys (``user-<i>``)."""
    rng = random.Random(seed)  # noqa: S311 - benchmark data
    names = [f"user-{i}" for i in range(keys)]
    return [
        Event(rng.choice(names), TOKEN, token=rng.randrange(4, vocab), id=f"0:{i}")
        for i in range(n)
    ]


def measure(
    *,
    tokens: int = 200_000,
    naive_tokens: int = 20_000,
    keys: int = 10_000,
    batch: int = 1024,
    layers: int = 2,
    hidden: int = 128,
    vocab: int = 256,
    device: str = "cpu",
    repeat: int = 5,
) -> dict[str, Any]:
    """The three paths back to back in each of ``repeat`` rounds; medians over the rounds.

    The machine is shared: the paths are compared within a round (median of the per-round
    ratios), rather than best-of-N per path at different times.
    """
    model, manifest = build(device, layers, hidden, vocab)
    events = make_events(tokens, keys, vocab)
    rounds = []
    for _ in range(repeat):
        naive = run_naive(model, manifest, events[:naive_tokens])
        engine = run_engine(model, manifest, events, batch, keys)
        ceiling = run_ceiling(model, tokens, batch)
        rounds.append((naive, engine, ceiling))
    med = statistics.median
    return {
        "config": {
            "tokens": tokens,
            "naive_tokens": naive_tokens,
            "keys": keys,
            "batch": batch,
            "layers": layers,
            "hidden": hidden,
            "vocab": vocab,
            "device": device,
            "repeat": repeat,
            "torch_threads": torch.get_num_threads(),
        },
        "naive": med(r[0] for r in rounds),
        "engine": med(r[1] for r in rounds),
        "ceiling": med(r[2] for r in rounds),
        "engine/naive": med(r[1] / r[0] for r in rounds),
        "engine/ceiling": med(r[1] / r[2] for r in rounds),
        "rounds": [list(r) for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--naive-tokens", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (median reported)")
    args = parser.parse_args()
    got = measure(
        tokens=args.tokens, naive_tokens=args.naive_tokens, keys=args.keys, batch=args.batch,
        layers=args.layers, hidden=args.hidden, vocab=args.vocab, device=args.device,
        repeat=args.repeat,
    )  # fmt: skip
    print(
        f"GRU {args.layers}x{args.hidden}, vocab {args.vocab}, {args.keys} keys, micro-batch "
        f"{args.batch}, {args.device}, torch threads {torch.get_num_threads()}, "
        f"median of {args.repeat} rounds"
    )
    print(f"{'path':<9} {'tokens/s':>12}")
    for name in ("naive", "engine", "ceiling"):
        print(f"{name:<9} {got[name]:>12,.0f}")
    print(f"engine / naive   {got['engine/naive']:6.1f}x  (target >= 25x)")
    print(f"engine / ceiling {got['engine/ceiling']:6.2f}x  (target >= 0.5x)")


if __name__ == "__main__":
    main()
