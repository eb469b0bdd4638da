"""CLI commands for data: built-in synthetic corpora and format conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


@click.group("data")
def data_group() -> None:
    """Make sample corpora and convert between sequence files and event logs."""


@click.command("synth")
@click.option(
    "--task", type=click.Choice(["next-token", "classify", "tag", "seq2seq"]), required=True
)
@click.option(
    "--out-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="writes train/valid/test.jsonl here",
)
@click.option("--n-train", type=int, default=2000, show_default=True)
@click.option("--n-valid", type=int, default=300, show_default=True)
@click.option("--n-test", type=int, default=300, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_cmd(task: str, out_dir: str, n_train: int, n_valid: int, n_test: int, seed: int) -> None:
    """Generate a synthetic corpus with learnable structure (no downloads needed)."""
    from stream_rnn.train.data import write_records
    from stream_rnn.train.synthetic import generate_split

    split = generate_split(task, n_train, n_valid, n_test, seed=seed)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", split.train), ("valid", split.valid), ("test", split.test)):
        n = write_records(out / f"{name}.jsonl", records)
        console.print(f"{name}: {n} sequences -> {out / f'{name}.jsonl'}")


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["events", "sequences"]), required=True)
@click.option(
    "--interleave-seed", type=int, default=None, help="interleave keys at random (events)"
)
@click.option("--with-ts", is_flag=True, help="stamp token events with a timestamp")
@click.option(
    "--level",
    type=click.Choice(["char", "word", "token"]),
    default="char",
    show_default=True,
    help="how text is split into token events",
)
def convert_cmd(
    src: str, dst: str, to: str, interleave_seed: int | None, with_ts: bool, level: Any
) -> None:
    """Convert whole-sequence JSONL <-> token event logs (one token event per line)."""
    from stream_rnn.train.data import read_records, records_to_events, write_events, write_records

    records = read_records(src)
    if to == "events":
        n = write_events(
            dst,
            records_to_events(
                records, level=level, interleave_seed=interleave_seed, with_ts=with_ts
            ),
        )
        console.print(f"{len(records)} sequences -> {n} events in {dst}")
    else:
        n = write_records(dst, records)
        console.print(f"{n} sequences -> {dst}")


data_group.add_command(synth_cmd)
data_group.add_command(convert_cmd)
