"""CLI commands of the stream side: simulate (in process), and later worker/produce/collect."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console

from stream_rnn.ops.settings import get_settings

console = Console(stderr=True, soft_wrap=True)


@click.command("simulate")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="JSONL (sequences or event log)",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="output JSONL in the `score` format",
)
@click.option(
    "--batch", type=int, default=1024, show_default=True, help="micro-batch size (events)"
)
@click.option("--seed", type=int, default=0, show_default=True, help="interleaving order")
@click.option(
    "--capacity", type=int, default=100_000, show_default=True, help="state pool capacity (keys)"
)
@click.option(
    "--storage",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--device", default=None, help="cpu, cuda, cuda:N (default: $STREAM_RNN_DEVICE or cpu)"
)
def simulate_cmd(
    model_dir: str,
    data: str,
    out_path: str,
    batch: int,
    seed: int,
    capacity: int,
    storage: str,
    device: str | None,
) -> None:
    """Replay sequences through the streaming engine in process (randomly interleaved keys).

    Writes exactly the line format of `stream-rnn score`; the two agree to 1e-5.
    """
    from stream_rnn.engine.engine import Engine
    from stream_rnn.engine.simulate import simulate
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.data import read_records

    if batch < 1:
        raise click.BadParameter(f"must be >= 1, got {batch}", param_hint="--batch")
    model, manifest = load_checkpoint(model_dir, device=device or get_settings().device)
    engine = Engine(model, manifest, capacity=capacity, storage=storage)
    records = read_records(data)
    started = time.monotonic()
    lines = simulate(engine, records, batch=batch, seed=seed)
    elapsed = time.monotonic() - started
    with Path(out_path).open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    pool = engine.pool
    console.print(
        f"simulated {len(lines)} sequences in {elapsed:.2f}s with {manifest.version} "
        f"(pool: {len(pool)} keys resident, {pool.evictions} evictions, {pool.restores} restores) "
        f"-> {out_path}"
    )
