"""``stream-rnn retrain``: the batch job of the learning loop, once or on a schedule.

Example::

    stream-rnn retrain --from-topic --last 1d --margin 0.01 \\
        --update-key-file ~/.config/stream-rnn/update.key --metrics-file /var/lib/node/retrain.prom
    stream-rnn retrain --data recorded.jsonl --epochs 5 --no-announce
    stream-rnn retrain --from-topic --last 1d --every 6h      # until SIGINT/SIGTERM
"""

from __future__ import annotations

import copy
import signal
import threading
import traceback
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from stream_rnn.ops.cli_model import train_cmd
from stream_rnn.ops.cli_models import POLICY_CHOICE, _announcer, _registry_option, report_announced
from stream_rnn.ops.settings import get_settings

if TYPE_CHECKING:
    from stream_rnn.train.trainer import TrainConfig

console = Console(stderr=True, soft_wrap=True)

# The `train` flags a retraining run takes, as `train` defines them. The architecture and
# vocabulary flags (--task, --cell, --level, --layers, --hidden, --embed, --dropout,
# --bidirectional, --tie-weights, --vocab, --max-vocab) are left out: a candidate has the
# production model's; --data/--valid/--init/--out are the registry's and the holdout's business.
TRAIN_FLAGS = (
    "epochs", "batch_size", "lr", "optimizer", "weight_decay", "lr_schedule", "warmup_steps",
    "clip", "tbptt", "tf_ratio", "tf_schedule", "tf_min", "tf_decay_steps", "tf_k", "patience",
    "monitor", "max_len", "max_minutes", "seed", "grad_dir", "device",
)  # fmt: skip
_RENAMED = {"tf_min": "tf_min_ratio", "tf_k": "tf_sigmoid_k"}


def _with_train_flags(command: click.Command) -> click.Command:
    """Give ``command`` copies of `train`'s own options named in `TRAIN_FLAGS`."""
    by_name = {p.name: p for p in train_cmd.params}
    command.params.extend(copy.copy(by_name[name]) for name in TRAIN_FLAGS)
    return command


def train_config(kw: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` of the train flags in ``kw``, read as `stream-rnn train` reads them."""
    from stream_rnn.train.trainer import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    options = {_RENAMED.get(k, k): kw[k] for k in TRAIN_FLAGS if _RENAMED.get(k, k) in known}
    options["device"] = str(kw["device"] or get_settings().device)
    if kw["tbptt"]:
        options["tbptt_k1"], options["tbptt_k2"] = kw["tbptt"]
    return TrainConfig(**options)


class _EpochLines:
    """A trainer callback that prints one line per epoch (works in logs, not only terminals)."""

    def on_step(self, step: int, epoch: int, loss: float, info: dict[str, Any]) -> None:
        return None

    def on_epoch(self, epoch: int, metrics: dict[str, Any], improved: bool) -> None:
        valid = "  ".join(f"{k} {v:.4f}" for k, v in metrics["valid"].items())
        mark = "  * best" if improved else ""
        console.print(
            f"epoch {epoch:>3}  train loss {metrics['train_loss']:.4f}  valid {valid}{mark}",
            markup=False,
            highlight=False,
        )


class _StopOnSignal:
    """First SIGINT/SIGTERM: stop after the current run. Second: abort the run now."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        name = signal.Signals(signum).name
        console.print(f"{name}: stopping after the current run ({name} again aborts it)")


def _usage(
    from_topic: bool, data: str | None, topic: str | None, last: str | None, every: str | None
) -> float | None:
    from stream_rnn.stream.exceptions import StreamError
    from stream_rnn.stream.record import parse_duration

    if from_topic == (data is not None):
        raise click.UsageError("give either --from-topic (record the tokens topic) or --data FILE")
    if data is not None and (topic is not None or last is not None):
        raise click.UsageError(
            "--topic and --last choose what --from-topic records; not with --data"
        )
    if last is not None:
        parse_duration(last)  # a bad window fails now, not at every run
    if every is None:
        return None
    try:
        return parse_duration(every)
    except StreamError as err:
        raise click.BadParameter(str(err).replace("--last", "--every", 1)) from None


@_with_train_flags
@click.command("retrain")
@_registry_option
@click.option(
    "--from-topic", is_flag=True, help="train on sequences recorded from the tokens topic"
)
@click.option("--bootstrap", default=None, metavar="HOST:PORT",
              help="Kafka (tokens topic and announcements; default: $STREAM_RNN_BOOTSTRAP)")  # fmt: skip
@click.option("--topic", default=None, help="tokens topic (default: $STREAM_RNN_TOKENS_TOPIC)")
@click.option("--last", default=None, metavar="DURATION",
              help="--from-topic window: 90s, 30m, 2h, 1d (default: the whole retained log)")  # fmt: skip
@click.option("--data", default=None, type=click.Path(exists=True, dir_okay=False),
              help="or train on this JSONL of recorded sequences (in time order)")  # fmt: skip
@click.option("--every", default=None, metavar="DURATION",
              help="run again every DURATION (start to start) until SIGINT/SIGTERM")  # fmt: skip
@click.option("--margin", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="publish only if the primary metric (next-token, tag, seq2seq: loss; classify: "
              "accuracy) is better by this fraction (0 = strictly better)")  # fmt: skip
@click.option("--force", is_flag=True, help="publish the candidate even if it is not better")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="most recent fraction of the sequences both models are judged on")  # fmt: skip
@click.option("--valid-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.1, show_default=True,
              help="sample of the rest the trainer validates on to keep its best epoch")  # fmt: skip
@click.option("--from-scratch", is_flag=True,
              help="start from fresh weights instead of production's (same architecture)")  # fmt: skip
@click.option("--policy", type=POLICY_CHOICE, default="rewarm", show_default=True,
              help="what workers do with live states when they swap to the new model")  # fmt: skip
@click.option("--update-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="key signing the announcement: Ed25519 private key or HMAC secret "
                   "(default: $STREAM_RNN_UPDATE_KEY_FILE)")  # fmt: skip
@click.option("--updates-topic", default=None,
              help="model-updates topic (default: $STREAM_RNN_MODEL_UPDATES_TOPIC)")  # fmt: skip
@click.option(
    "--no-announce", is_flag=True, help="publish in the registry only; workers are not told"
)
@click.option("--log", "log_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON line per run appended here (default: <registry>/retrain.jsonl)")  # fmt: skip
@click.option("--metrics-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Prometheus text file rewritten after every run (textfile collector, Pushgateway)")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="serve Prometheus /metrics while --every runs (host: $STREAM_RNN_METRICS_HOST)")  # fmt: skip
def retrain_cmd(**kw: Any) -> None:
    """Retrain the production model on recorded sequences; publish the candidate if it is better.

    Holds out the most recent --holdout of the sequences, trains a candidate with production's
    architecture and vocabulary (from its weights unless --from-scratch) on the rest, scores
    both on the held-out rows, and registers, promotes and announces the candidate only when
    it beats production by --margin (or with --force). Each run appends one JSON line to --log.
    """
    from stream_rnn.ops.retrain import FileSource, RetrainJob, TopicSource, run_every, run_once
    from stream_rnn.ops.retrain_report import summary_line
    from stream_rnn.registry.updates import load_update_key

    every = _usage(kw["from_topic"], kw["data"], kw["topic"], kw["last"], kw["every"])
    settings = get_settings()
    registry = kw["registry_dir"] or settings.registry
    bootstrap = kw["bootstrap"] or settings.bootstrap
    key_path = kw["update_key_file"] or settings.update_key_file
    if not kw["no_announce"] and key_path is not None:
        load_update_key(key_path)  # a bad key fails now, not after the training
    source: TopicSource | FileSource = (
        FileSource(Path(kw["data"]))
        if kw["data"] is not None
        else TopicSource(
            bootstrap, kw["topic"] or settings.tokens_topic, kw["last"], settings.max_message_bytes
        )
    )
    job = RetrainJob(
        registry=Path(registry),
        source=source,
        train=train_config(kw),
        holdout=kw["holdout"],
        valid=kw["valid_fraction"],
        margin=kw["margin"],
        force=kw["force"],
        from_scratch=kw["from_scratch"],
        policy=kw["policy"],
        grad_dir=Path(kw["grad_dir"]) if kw["grad_dir"] else None,
        log_path=kw["log_path"],
        metrics_path=kw["metrics_file"],
    )

    def prepare_announce() -> Any:
        from stream_rnn.registry.updates import announce_production

        announcer = _announcer(
            bootstrap, kw["updates_topic"], kw["update_key_file"], kw["no_announce"]
        )

        def announce(reg: Any, version: str) -> bool:
            # called by run_once under the registry's lock, right after its promotion
            done = announce_production(
                reg, lambda _: version, policy=kw["policy"], announcer=announcer
            )
            report_announced(done, announcer, kw["policy"])
            return announcer is not None

        return announce

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    def one_run() -> Exception | None:
        result = run_once(
            job, prepare_announce=prepare_announce, callbacks=[_EpochLines()], say=say
        )
        click.echo(summary_line(result.entry))
        return result.error

    if every is None:
        if kw["metrics_port"] is not None:
            raise click.UsageError(
                "--metrics-port serves metrics while --every runs; a one-shot run writes them "
                "with --metrics-file (node_exporter's textfile collector, or a Pushgateway)"
            )
        error = one_run()
        if error is not None:
            raise error
        return
    server = _metrics_server(kw["metrics_port"] or settings.metrics_port, settings, job)
    stop = _StopOnSignal()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        say(f"retraining every {kw['every']}; SIGINT/SIGTERM stops after the current run")

        def scheduled() -> None:
            error = one_run()
            if error is not None:
                _report(error)

        runs = run_every(every, scheduled, stop.event)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
    say(f"stopped after {runs} runs")


def _metrics_server(port: int | None, settings: Any, job: Any) -> Any:
    """``/metrics`` of the retrain log while the schedule runs (None without a port)."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry

    from stream_rnn.ops.retrain_report import LogCollector
    from stream_rnn.stream.sensors import MetricsServer

    registry = CollectorRegistry()
    registry.register(LogCollector(job.log))
    server = MetricsServer(registry, port=port, host=settings.metrics_host)
    server.start()
    console.print(f"metrics on http://{settings.metrics_host}:{port}/metrics", markup=False)
    return server


def _report(error: Exception) -> None:
    """A failed scheduled run: one line for a user error, the traceback for anything else."""
    from stream_rnn.engine.exceptions import EngineError
    from stream_rnn.model.exceptions import ModelError
    from stream_rnn.ops.exceptions import OpsError
    from stream_rnn.registry.exceptions import RegistryError
    from stream_rnn.stream.exceptions import StreamError
    from stream_rnn.train.exceptions import TrainError

    known = (ModelError, TrainError, RegistryError, OpsError, StreamError, EngineError, OSError)
    if isinstance(error, known):
        console.print(f"error: {error}", markup=False, highlight=False)
    else:
        console.print("".join(traceback.format_exception(error)), markup=False, highlight=False)
    console.print("the loop goes on; the next run is scheduled", markup=False, highlight=False)
