"""The ``stream-rnn`` command line."""

from __future__ import annotations

import sys

import click

from stream_rnn import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="stream-rnn")
def cli() -> None:
    """stream_rnn: recurrent networks over real-time token streams.

    Train with BPTT (train), score recorded sequences offline (score), generate text
    (generate), inspect gradients through time (grad-report), make or convert data (data),
    run a local Kafka broker (kafka), stream over Kafka (topics, worker, produce, collect, record),
    manage and announce model versions (models), or run the whole job end to end (demo).
    Retrain production on recorded sequences and publish the candidate if better (retrain).
    """


def _register() -> None:
    from stream_rnn.ops.cli_data import data_group
    from stream_rnn.ops.cli_model import (
        generate_cmd,
        grad_report_cmd,
        info_cmd,
        score_cmd,
        train_cmd,
    )
    from stream_rnn.ops.cli_models import models_group
    from stream_rnn.ops.cli_stream import (
        collect_cmd,
        produce_cmd,
        record_cmd,
        simulate_cmd,
        topics_group,
        worker_cmd,
    )
    from stream_rnn.ops.demo import demo_cmd
    from stream_rnn.ops.kafka_cli import kafka_group

    for command in (
        train_cmd,
        score_cmd,
        generate_cmd,
        grad_report_cmd,
        info_cmd,
        simulate_cmd,
        worker_cmd,
        produce_cmd,
        collect_cmd,
        record_cmd,
        demo_cmd,
    ):
        cli.add_command(command)
    cli.add_command(data_group)
    cli.add_command(kafka_group)
    cli.add_command(topics_group)
    cli.add_command(models_group)
    from stream_rnn.ops.cli_retrain import retrain_cmd

    cli.add_command(retrain_cmd)
    from stream_rnn.ops.settings_doc import settings_cmd

    cli.add_command(settings_cmd)
    from stream_rnn.ops.cli_replay import replay_cmd

    cli.add_command(replay_cmd)


_register()


def main() -> None:
    """Console-script entry point; user errors become one clear line and exit status 2."""
    from stream_rnn.engine.exceptions import EngineError
    from stream_rnn.model.exceptions import ModelError
    from stream_rnn.ops.exceptions import OpsError
    from stream_rnn.registry.exceptions import RegistryError
    from stream_rnn.stream.exceptions import StreamError
    from stream_rnn.train.exceptions import TrainError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (ModelError, TrainError, RegistryError, OpsError, StreamError, EngineError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FileNotFoundError as exc:
        click.echo(f"error: file not found: {exc.filename}", err=True)
        sys.exit(2)
