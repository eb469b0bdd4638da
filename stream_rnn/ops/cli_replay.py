"""``stream-rnn replay``: recorded sequences through the system with their timing, and a report.

Example::

    stream-rnn replay --data events.jsonl --model runs/lang --speed 10 --report runs/replay
    stream-rnn replay --data valid.jsonl --to kafka --rate 500 --registry runs/registry \\
        --out streamed.jsonl --report runs/replay-kafka
    stream-rnn replay --data valid.jsonl --to kafka --rate 200 --registry runs/registry \\
        --workers 2 --fault malformed:20@10% --fault kill:2@30% --fault restart@50% \\
        --fault publish:runs/v2@60% --report runs/replay-faults
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from stream_rnn.ops.cli_options import data_option
from stream_rnn.ops.settings import Settings, get_settings

console = Console(stderr=True, soft_wrap=True)
Marker = tuple[float, str]  # (seconds on the replay's clock, label) on the report's plots


class RichReplayProgress:
    """Two bars on stderr: messages sent, and messages answered of those that must be."""

    def __init__(self) -> None:
        self.bars = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.sent: TaskID | None = None
        self.answered: TaskID | None = None

    def start(self, total: int, expected: int) -> None:
        self.sent = self.bars.add_task("sent", total=total)
        self.answered = self.bars.add_task("answered", total=expected)
        self.bars.start()

    def update(self, sent: int, answered: int) -> None:
        if self.sent is not None and self.answered is not None:
            self.bars.update(self.sent, completed=sent)
            self.bars.update(self.answered, completed=answered)

    def close(self) -> None:
        self.bars.stop()


@click.command("replay")
@data_option
@click.option("--speed", type=float, default=None,
              help="event logs: recorded inter-arrival times divided by this (default 1)")  # fmt: skip
@click.option("--rate", type=float, default=None,
              help="tokens per second, spread evenly (whole sequences: default 1000)")  # fmt: skip
@click.option("--max", "fast", is_flag=True, help="as fast as possible")
@click.option("--to", "target", type=click.Choice(["inproc", "kafka"]), default="inproc",
              show_default=True, help="in process through the engine, or a live system")  # fmt: skip
@click.option("--bootstrap", default=None, metavar="HOST:PORT",
              help="kafka: bootstrap address (default $STREAM_RNN_BOOTSTRAP)")  # fmt: skip
@click.option("--topic", default=None, help="kafka: tokens topic (default from settings)")
@click.option("--predictions-topic", default=None, help="kafka: predictions topic")
@click.option("--dead-letter-topic", default=None, help="kafka: dead-letter topic")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="checkpoint to serve (inproc) and to check against (or --registry)")  # fmt: skip
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="registry: its production version (inproc); any version named by a "
              "prediction is checked against (default $STREAM_RNN_REGISTRY)")  # fmt: skip
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="predictions as `stream-rnn score` lines (JSONL)")  # fmt: skip
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="write report.md, report.html and PNG plots here")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True,
              help="whole sequences: interleaving of the keys")  # fmt: skip
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="kafka: give up after this many seconds without a new answer")  # fmt: skip
@click.option("--capacity", type=click.IntRange(min=1), default=None,
              help="inproc: state pool capacity (default $STREAM_RNN_CAPACITY)")  # fmt: skip
@click.option("--ttl", "ttl_s", type=float, default=None,
              help="inproc: idle keys leave memory after S seconds of replay time")  # fmt: skip
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="inproc: largest micro-batch (default $STREAM_RNN_MAX_BATCH)")  # fmt: skip
@click.option("--storage", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="inproc: dtype of resident states (default $STREAM_RNN_STORAGE)")  # fmt: skip
@click.option("--running-estimate", is_flag=True,
              help="inproc, classify: a label estimate per token")  # fmt: skip
@click.option("--device", default=None, help="inproc: cpu, cuda, cuda:N")
@click.option("--history", type=click.IntRange(min=0), default=None,
              help="the workers' token history, to check a rewarm swap (default "
              "$STREAM_RNN_HISTORY)")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0, max=16), default=0, show_default=True,
              help="kafka: start N exactly-once workers of the replay's own group (serving "
              "--model or --registry; logs in the --report dir)")  # fmt: skip
@click.option("--fault", "faults", multiple=True, metavar="KIND[:ARG]@WHEN",
              help="inject a fault at P% of the messages or S s: kill[:W], restart[:W], "
              "add[:W], remove[:W], broker-restart[:S], publish:MODEL, malformed[:N] "
              "(repeatable; see the README)")  # fmt: skip
@click.option("--kafka-data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="kafka: data dir of the `stream-rnn kafka up` broker, for broker-restart "
              "(default $STREAM_RNN_KAFKA_DATA_DIR)")  # fmt: skip
@click.option("--update-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="publish: sign the announcement; the replay's workers verify with it "
              "(default $STREAM_RNN_UPDATE_KEY_FILE)")  # fmt: skip
def replay_cmd(**opts: Any) -> None:
    """Replay recorded sequences (whole-sequence JSONL or an event log) with their timing.

    In process through the engine (--to inproc, no broker) or into the tokens topic of a live
    system (--to kafka), optionally with workers of its own (--workers) and faults injected
    mid-stream (--fault). Writes the predictions in the `score` line format (--out) and a
    report with plots (--report); prints a summary. Exits 1 if a guarantee check fails.
    """
    from stream_rnn.ops.exceptions import OpsError
    from stream_rnn.registry.exceptions import RegistryError
    from stream_rnn.replay.exceptions import ReplayError

    try:
        _replay(get_settings(), **opts)
    except (ReplayError, OpsError, RegistryError) as err:
        raise click.ClickException(str(err)) from err


def _replay(settings: Settings, **o: Any) -> None:
    from stream_rnn.replay.analysis import analyse
    from stream_rnn.replay.faults import (
        PlanContext,
        check_plan,
        fault_check,
        fault_markers,
        inject_malformed,
        malformed_records,
        parse_faults,
        workers_check,
    )
    from stream_rnn.replay.report import summary_table, write_report
    from stream_rnn.replay.schedule import Timing, build_schedule

    if sum(x is not None for x in (o["speed"], o["rate"])) + o["fast"] > 1:
        raise click.UsageError("give at most one of --speed, --rate and --max")
    if o["workers"] and o["target"] != "kafka":
        raise click.UsageError("--workers starts workers of a live system: give --to kafka")
    faults = parse_faults(o["faults"])
    device = o["device"] or settings.device
    model, manifest, load = _models(o["model_dir"], o["registry"] or settings.registry, device)
    level = manifest.vocab["level"]
    timing = Timing(speed=o["speed"] or 1.0, rate=o["rate"], fast=o["fast"])
    schedule = build_schedule(o["data"], level=level, timing=timing, seed=o["seed"])
    context = PlanContext(
        kafka=o["target"] == "kafka",
        workers=o["workers"],
        fixed_model=o["model_dir"] is not None,
        duration=schedule.duration,
        fast=timing.fast,
    )
    faults = check_plan(faults, context)
    schedule, placed = inject_malformed(schedule, faults)
    console.print(
        f"replaying {len(schedule.events):,} messages ({schedule.tokens:,} tokens, "
        f"{schedule.keys:,} keys, {schedule.duration:.1f} s scheduled) {o['target']}, "
        f"{timing.describe(schedule.source)}, model {manifest.version}"
    )
    running = bool(o["running_estimate"] or settings.running_estimate)
    started_wall = time.time()
    exits: list[str] = []
    exit_markers: list[tuple[float, str]] = []
    if o["target"] == "inproc":
        result = _run_inproc(settings, o, schedule, (model, manifest, load), running, faults)
    else:
        result, exits, exit_markers = _run_kafka(settings, o, schedule, model.config.task, faults)
    result.faults = sorted(
        result.faults
        + malformed_records(faults, placed, result.sent_at, result.wall0 or started_wall),
        key=lambda r: r.order,
    )
    history = o["history"] if o["history"] is not None else settings.history
    analysis = analyse(
        schedule,
        result,
        task=model.config.task,
        load=load,
        running_estimate=running,
        history=history,
        markers=sorted(fault_markers(result.faults) + exit_markers),
    )
    if faults:
        analysis.checks.append(fault_check(result.faults))
    if o["workers"]:
        analysis.checks.append(workers_check(exits))
    if o["out_path"]:
        with Path(o["out_path"]).open("w", encoding="utf-8") as fh:
            for line in analysis.lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        console.print(f"{len(analysis.lines):,} lines -> {o['out_path']}")
    if o["report_dir"]:
        paths = write_report(
            Path(o["report_dir"]), analysis, title=f"Replay of {o['data']}", faults=result.faults
        )
        console.print(f"report -> {paths[0]} (+ {', '.join(p.name for p in paths[1:])})")
    console.print(summary_table(analysis, result.faults))
    if not analysis.passed:
        failed = [c.name for c in analysis.checks if c.passed is False]
        console.print(f"[bold red]guarantee checks failed:[/bold red] {'; '.join(failed)}")
        sys.exit(1)


def _models(model_dir: str | None, registry_dir: Path, device: str) -> Any:
    """(model, manifest, load(version)) from --model, else the registry's production version;
    ``load`` finds any other version in the registry."""
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.registry.exceptions import RegistryError
    from stream_rnn.registry.versions import Registry

    registry = Registry(registry_dir)
    if model_dir is not None:
        model, manifest = load_checkpoint(model_dir, device=device)
    else:
        current = registry.production() if registry_dir.is_dir() else None
        if current is None:
            raise click.UsageError(
                f"no model: give --model DIR, or --registry DIR with a production version "
                f"(the registry at {registry_dir} has none)"
            )
        model, manifest = load_checkpoint(registry.path(current), device=device)
    # other versions (a model published mid-stream) from the registry, if it has them, or
    # loaded for an in-process swap (load.cache)
    cache: dict[str, Any] = {manifest.version: (model, manifest)}

    def load(version: str) -> Any:
        if version not in cache:
            try:
                cache[version] = load_checkpoint(registry.path(version), device=device)
            except RegistryError:
                cache[version] = None
        return cache[version]

    load.cache = cache  # type: ignore[attr-defined]
    return model, manifest, load


def _run_inproc(
    settings: Settings,
    o: dict[str, Any],
    schedule: Any,
    models: tuple[Any, Any, Any],
    running: bool,
    faults: list[Any],
) -> Any:
    from stream_rnn.engine.engine import Engine
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.replay.inproc import InprocOptions, run_inproc, swaps_of

    model, manifest, load = models
    device = o["device"] or settings.device

    def load_source(source: str) -> Any:  # publish:DIR or publish:VERSION (of --registry)
        if (Path(source) / "manifest.json").is_file():
            found = load_checkpoint(source, device=device)
            load.cache.setdefault(found[1].version, found)  # the report's agreement check
            return found
        found = load(source)
        if found is None:
            raise click.UsageError(f"publish:{source}: no checkpoint directory or registry version")
        return found

    history = o["history"] if o["history"] is not None else settings.history

    engine = Engine(
        model,
        manifest,
        capacity=o["capacity"] or settings.capacity,
        ttl_s=o["ttl_s"] if o["ttl_s"] is not None else settings.ttl_s,
        storage=o["storage"] or settings.storage,
        running_estimate=running,
        history=history,
    )
    options = InprocOptions(
        fast=schedule.timing.fast,
        max_batch=o["max_batch"] or settings.max_batch,
        expire_interval_s=settings.expire_interval_s,
        unknown=settings.unknown_token,
        max_bytes=settings.max_message_bytes,
        max_tokens=settings.max_chunk_tokens,
    )
    swaps = swaps_of(faults, schedule, load_source)
    return run_inproc(schedule, engine, options=options, progress=RichReplayProgress(), swaps=swaps)


def _run_kafka(
    settings: Settings, o: dict[str, Any], schedule: Any, task: str, faults: list[Any]
) -> tuple[Any, list[str], list[Marker]]:
    """Through Kafka, with the replay's own workers and faults when asked for; the result, and
    the owned workers that exited by themselves (what happened, markers for the plots)."""
    from stream_rnn.replay.kafka import ReplayTopics, run_kafka
    from stream_rnn.replay.schedule import answer_expected, tokens_answered

    running = bool(o["running_estimate"] or settings.running_estimate)
    expected = answer_expected(schedule, tokens_answered(task, running))
    if not o["workers"] and not any(f.active for f in faults):
        topics = ReplayTopics(
            o["topic"] or settings.tokens_topic,
            o["predictions_topic"] or settings.predictions_topic,
            o["dead_letter_topic"] or settings.dead_letter_topic,
        )
        result = run_kafka(
            schedule,
            bootstrap=o["bootstrap"] or settings.bootstrap,
            topics=topics,
            expected=expected,
            timeout_s=o["timeout_s"],
            progress=RichReplayProgress(),
        )
        return result, [], []
    return _run_owned(settings, o, schedule, expected, faults)


def _run_owned(
    settings: Settings, o: dict[str, Any], schedule: Any, expected: list[bool], faults: list[Any]
) -> tuple[Any, list[str], list[Marker]]:
    """`run_kafka` with a `ReplaySystem`: the replay's workers, and the faults fired at it."""
    from stream_rnn.ops.replay_system import ReplaySystem, local_broker, new_run_id
    from stream_rnn.ops.workers import sigterm_interrupts
    from stream_rnn.replay.injector import FaultInjector
    from stream_rnn.replay.kafka import run_kafka

    setup = _setup(settings, o, faults, new_run_id())
    if any(f.kind == "broker-restart" for f in faults):
        setup = replace(setup, broker=local_broker(_kafka_data_dir(settings, o), setup.bootstrap))
    say = _say
    with sigterm_interrupts(), ReplaySystem(setup, say=say) as system:
        if o["workers"]:
            say(
                f"starting {o['workers']} exactly-once worker(s), group {setup.group}, topics "
                f"{setup.topics.tokens} etc. at {setup.bootstrap}; logs in {system.logs}"
            )
            system.start_workers(o["workers"], settings.partitions)
        injector = FaultInjector(faults, system, say=say)
        try:
            result = run_kafka(
                schedule,
                bootstrap=setup.bootstrap,
                topics=setup.topics,
                expected=expected,
                timeout_s=o["timeout_s"],
                progress=RichReplayProgress(),
                faults=injector,
            )
        finally:
            records = injector.finish()
    result.faults = records
    exits = [gone.describe(result.wall0) for gone in system.exits]
    result.notes += exits
    markers = [(e.wall - result.wall0, f"{e.name} exited ({e.status})") for e in system.exits]
    return result, exits, markers


def _kafka_data_dir(settings: Settings, o: dict[str, Any]) -> Path:
    return Path(o["kafka_data_dir"] or settings.kafka_data_dir).expanduser()


def _setup(settings: Settings, o: dict[str, Any], faults: list[Any], run: str) -> Any:
    """The `SystemSetup`: bootstrap, topics (this run's own when the replay starts the workers
    and none are given), what the workers serve, the registry and key for publish faults."""
    from stream_rnn.ops.replay_system import SystemSetup
    from stream_rnn.registry.updates import load_update_key
    from stream_rnn.registry.versions import Registry
    from stream_rnn.replay.kafka import ReplayTopics
    from stream_rnn.replay.publish import check_model_source

    bootstrap = o["bootstrap"]
    if bootstrap is None and o["kafka_data_dir"] is not None:
        from stream_rnn.ops.kafka_local import LocalKafka

        bootstrap = LocalKafka(_kafka_data_dir(settings, o)).status().bootstrap
    owned = bool(o["workers"])
    own = (f"{run}.tokens", f"{run}.predictions", f"{run}.dead-letters")
    base = (settings.tokens_topic, settings.predictions_topic, settings.dead_letter_topic)
    default = own if owned else base
    topics = ReplayTopics(
        o["topic"] or default[0],
        o["predictions_topic"] or default[1],
        o["dead_letter_topic"] or default[2],
    )
    registry = Registry(o["registry"] or settings.registry)
    publishes = [f for f in faults if f.kind == "publish"]
    if publishes and not registry.root.is_dir():
        raise click.UsageError(
            f"--fault {publishes[0].spec} publishes into a registry: give --registry DIR "
            f"(there is none at {registry.root})"
        )
    for fault in publishes:
        check_model_source(registry, fault.arg or "")
    key_file = o["update_key_file"] or settings.update_key_file
    key = load_update_key(key_file) if key_file is not None else None
    follows = owned and o["model_dir"] is None
    updates_topic = f"{run}.model-updates" if follows else settings.model_updates_topic
    if report := o["report_dir"]:
        base_dir = Path(report)
    else:
        base_dir = settings.runs_dir / "replay" / run
    return SystemSetup(
        bootstrap=bootstrap or settings.bootstrap,
        topics=topics,
        group=run,
        base_dir=base_dir,
        model_dir=Path(o["model_dir"]) if o["model_dir"] else None,
        registry=registry,
        updates_topic=updates_topic,
        key_file=key_file if follows else None,
        key=key,
        history=o["history"],
    )


def _say(text: str) -> None:
    # paths, versions and log lines are data: never rich markup
    console.print(text, markup=False, highlight=False)
