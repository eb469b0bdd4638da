"""Click options that several ``stream-rnn`` commands share, defined once."""

from __future__ import annotations

from typing import Any

import click

model_option = click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="checkpoint directory (weights.safetensors + manifest.json)",
)

data_option = click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="JSONL (sequences or event log)",
)


def device_option(f: Any) -> Any:
    return click.option(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto (default: $STREAM_RNN_DEVICE or cpu)",
    )(f)
