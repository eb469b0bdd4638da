"""``stream-rnn kafka up|down|status``: a local single-node Kafka broker for development.

The main CLI attaches the group with ``cli.add_command(kafka_group)``.

Example::

    $ export KAFKA_BOOTSTRAP=$(stream-rnn kafka up)   # prints only the address on stdout
    $ stream-rnn kafka status
    $ stream-rnn kafka down
"""

from __future__ import annotations

from pathlib import Path

import click

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.kafka_jars import KAFKA_VERSION_ENV, jars_dir, jars_ready
from stream_rnn.ops.kafka_local import DEFAULT_HEAP, START_TIMEOUT_S, STOP_TIMEOUT_S, LocalKafka

__all__ = ["DATA_DIR_ENV", "DEFAULT_DATA_DIR", "EXIT_NOT_RUNNING", "kafka_group"]

DATA_DIR_ENV = "STREAM_RNN_KAFKA_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.local/state/stream-rnn/kafka").expanduser()
EXIT_NOT_RUNNING = 3
"""Exit status of ``status`` when no broker runs (the LSB convention for "not running")."""

_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    envvar=DATA_DIR_ENV,
    show_envvar=True,
    help="Directory holding the broker's data, logs and pid file.",
)


@click.group("kafka")
def kafka_group() -> None:
    """Run a local single-node Apache Kafka broker (KRaft, 127.0.0.1 only)."""


@kafka_group.command("up")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Client port; default: the data dir's recorded port, else a free one.",
)
@_data_dir_option
@click.option(
    "--version",
    "kafka_version",
    default=None,
    help=f"Kafka version; default: the data dir's, else ${KAFKA_VERSION_ENV}, else the tested one.",
)
@click.option("--heap", default=DEFAULT_HEAP, show_default=True, help="JVM -Xmx of the broker.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=START_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the broker to accept requests (jar download not included).",
)
def up(
    port: int | None, data_dir: Path, kafka_version: str | None, heap: str, timeout: float
) -> None:
    """Start the broker in the background; print its bootstrap address once it serves."""
    kafka = LocalKafka(data_dir, version=kafka_version, heap=heap)
    try:
        if not jars_ready(kafka.version):
            click.echo(
                f"Downloading the Kafka {kafka.version} broker jars into "
                f"{jars_dir(kafka.version)} (first run only)...",
                err=True,
            )
        info = kafka.start(port=port, timeout=timeout)
    except OpsError as error:
        raise click.ClickException(str(error)) from error
    state = "already running" if info.already_running else "started"
    click.echo(
        f"Kafka {info.version} {state} (pid {info.pid}); data in {info.data_dir}, "
        f"log in {info.log_file}",
        err=True,
    )
    # Only the address goes to stdout, so that `$(stream-rnn kafka up)` captures it.
    click.echo(info.bootstrap)


@kafka_group.command("down")
@_data_dir_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
def down(data_dir: Path, timeout: float) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after --timeout); its data is kept."""
    try:
        stopped = LocalKafka(data_dir).stop(timeout)
    except OpsError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"Kafka in {data_dir} " + ("stopped." if stopped else "was not running."))


@kafka_group.command("status")
@_data_dir_option
def status(data_dir: Path) -> None:
    """Show whether the broker runs; exit status 3 when it does not."""
    try:
        found = LocalKafka(data_dir).status()
    except OpsError as error:
        raise click.ClickException(str(error)) from error
    if not found.formatted:
        click.echo(f"No Kafka broker in {found.data_dir} (not formatted, not running).")
    elif found.running:
        serving = "accepting connections" if found.accepting else "not accepting connections yet"
        click.echo(
            f"Kafka {found.version} running (pid {found.pid}) at {found.bootstrap}, {serving}; "
            f"log: {found.log_file}"
        )
    else:
        click.echo(
            f"Kafka {found.version} in {found.data_dir} is not running (last address "
            f"{found.bootstrap}); start it with `stream-rnn kafka up --data-dir {found.data_dir}`."
        )
    if not found.running:
        click.get_current_context().exit(EXIT_NOT_RUNNING)
