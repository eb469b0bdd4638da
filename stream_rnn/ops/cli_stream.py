"""CLI commands of the stream side: simulate (in process), worker, produce, collect, topics.

Every Kafka-facing command takes ``--bootstrap HOST:PORT`` (default ``$STREAM_RNN_BOOTSTRAP``).

Example::

    stream-rnn topics create --partitions 4
    stream-rnn worker --model runs/lang --group g1 &     # as many as there are partitions
    stream-rnn produce --data valid.jsonl --interleave-seed 1
    stream-rnn collect --out streamed.jsonl --timeout 5
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from stream_rnn.ops.cli_options import data_option, model_option
from stream_rnn.ops.settings import Settings, get_settings

console = Console(stderr=True, soft_wrap=True)


@click.command("simulate")
@model_option
@data_option
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


# ---------------------------------------------------------------------------- Kafka commands
def _bootstrap_option(fn: Any) -> Any:
    return click.option(
        "--bootstrap",
        default=None,
        metavar="HOST:PORT",
        help="Kafka bootstrap address (default: $STREAM_RNN_BOOTSTRAP or 127.0.0.1:9092)",
    )(fn)


def _topic_settings(**topics: str | None) -> Settings:
    base = get_settings()
    return base.model_copy(update={k: v for k, v in topics.items() if v is not None})


@click.command("worker")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="serve this fixed checkpoint directory (or --registry)")  # fmt: skip
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="serve the registry's production version and hot-swap announced ones "
              "(default $STREAM_RNN_REGISTRY)")  # fmt: skip
@click.option("--update-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ed25519 public key (models keygen) or HMAC secret: refuse model updates not "
              "signed with it")  # fmt: skip
@click.option("--allow-unsigned-updates", is_flag=True, default=None,
              help="accept unsigned model updates (anyone who can write the updates topic picks "
              "the served version; default $STREAM_RNN_ALLOW_UNSIGNED_UPDATES)")  # fmt: skip
@click.option("--history", type=click.IntRange(min=0), default=None,
              help="tokens kept per key so that a swap can rewarm states (default 0: off)")  # fmt: skip
@click.option("--swap-policy", type=click.Choice(["keep", "reset", "rewarm"]), default=None,
              help="for states restored under another model version (default: rewarm with "
              "--history, else reset)")  # fmt: skip
@_bootstrap_option
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: settings)")
@click.option("--group", default=None, help="consumer group = faust app id (default: settings)")
@click.option("--topic", default=None, help="tokens topic (default: stream-rnn.tokens)")
@click.option("--predictions-topic", default=None, help="default: stream-rnn.predictions")
@click.option("--dead-letter-topic", default=None, help="default: stream-rnn.dead-letters")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="micro-batch size")
@click.option("--max-wait", type=click.FloatRange(min=0.001), default=None, help="seconds")
@click.option("--max-bytes", type=click.IntRange(min=16), default=None, help="largest value")
@click.option("--capacity", type=click.IntRange(min=1), default=None, help="resident keys")
@click.option("--ttl", type=click.FloatRange(min=0.001), default=None, help="idle key TTL (s)")
@click.option("--storage", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option(
    "--unknown", type=click.Choice(["unk", "reject"]), default=None, help="unknown tokens"
)
@click.option("--running-estimate", is_flag=True, default=None, help="classify: per-token label")
@click.option("--partitions", type=click.IntRange(min=1), default=None, help="new tokens topic")
@click.option("--web-port", type=click.IntRange(1, 65535), default=None, help="status endpoint")
@click.option("--web-host", default=None,
              help="address the status endpoint binds (default 127.0.0.1; 0.0.0.0 in a container)")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="serve Prometheus /metrics on this port ($STREAM_RNN_METRICS_PORT)")  # fmt: skip
@click.option("--metrics-host", default=None,
              help="address /metrics binds (default 127.0.0.1; 0.0.0.0 in a container)")  # fmt: skip
@click.option("--faust-metrics", is_flag=True, default=None,
              help="also expose faust's own sensor on /metrics (faust_* names)")  # fmt: skip
@click.option(
    "--guarantee",
    type=click.Choice(["exactly-once", "at-least-once"]),
    default=None,
    help="exactly-once (default): outputs, states and offsets in one Kafka transaction per "
    "partition; at-least-once: lower latency, duplicates (same ids) after a crash",
)
@click.option("--commit-interval", type=click.FloatRange(min=0.001), default=None,
              help="exactly-once: seconds between transaction commits (default 0.1)")  # fmt: skip
@click.option("--state-retention", type=click.FloatRange(min=0.001), default=None,
              help="delete a key's state (tombstone) after this many idle seconds")  # fmt: skip
@click.option("--broker-timeout", type=click.FloatRange(min=1), default=None,
              help="exit with a message when the broker is unreachable this long (default 120)")  # fmt: skip
def worker_cmd(model_dir: str | None, bootstrap: str | None, **kw: Any) -> None:
    """Run one stream worker until SIGTERM/SIGINT (start several with one --group to scale).

    Consumes the tokens topic in micro-batches, writes predictions and dead letters. Creates
    the topics if missing (with --partitions, default $STREAM_RNN_PARTITIONS). Serves --model,
    or the production version of --registry, swapping in every version announced later.
    """
    from stream_rnn.stream.worker_app import run_worker
    from stream_rnn.stream.worker_options import WorkerOptions

    settings = get_settings()
    registry = kw["registry"] or (
        settings.registry if "registry" in settings.model_fields_set else None
    )
    if (model_dir is None) == (registry is None):
        raise click.UsageError(
            "give exactly one of --model DIR (a fixed model) and --registry DIR (the registry's "
            "production version, hot-swapped when a new one is announced)"
        )
    renamed = {
        "tokens_topic": kw.pop("topic"),
        "predictions_topic": kw.pop("predictions_topic"),
        "dead_letter_topic": kw.pop("dead_letter_topic"),
        "max_wait_s": kw.pop("max_wait"),
        "max_message_bytes": kw.pop("max_bytes"),
        "ttl_s": kw.pop("ttl"),
        "unknown_token": kw.pop("unknown"),
        "commit_interval_s": kw.pop("commit_interval"),
        "state_retention_s": kw.pop("state_retention"),
        "broker_timeout_s": kw.pop("broker_timeout"),
    }
    opts = WorkerOptions.from_settings(
        model_dir or registry or "", settings, bootstrap=bootstrap, **renamed, **kw
    )
    logging.basicConfig(level=opts.log_level, stream=sys.stderr)
    sys.exit(run_worker(opts, settings))


@click.command("produce")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@_bootstrap_option
@click.option("--topic", default=None, help="tokens topic (default: stream-rnn.tokens)")
@click.option("--level", type=click.Choice(["char", "word", "token"]), default=None,
              help="how to split 'text' records (default: --model's vocabulary, else char)")  # fmt: skip
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="take the split level from this checkpoint's vocabulary")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=0.001), default=None, help="tokens per second")
@click.option("--interleave-seed", type=int, default=None, help="mix sequences at random")
@click.option("--chunk", type=click.IntRange(min=1), default=1, show_default=True,
              help="coalesce up to N tokens of a key into one `tokens` event (1: one `token` "
              "event per token); keep N within the workers' STREAM_RNN_MAX_CHUNK_TOKENS")  # fmt: skip
@click.option("--linger-ms", type=click.IntRange(min=0), default=5, show_default=True,
              help="longest wait of a key's first token for company in its chunk (and the "
              "Kafka client's linger)")  # fmt: skip
def produce_cmd(
    data: str,
    bootstrap: str | None,
    topic: str | None,
    level: str | None,
    model_dir: str | None,
    rate: float | None,
    interleave_seed: int | None,
    chunk: int,
    linger_ms: int,
) -> None:
    """Push recorded sequences (either JSONL format) as token events plus an `end` each.

    With `--chunk N`, a key's tokens go out in `tokens` events of up to N tokens (sent when
    full, after `--linger-ms`, or before the key's `end`); the worker answers each with one
    prediction, and `stream-rnn collect` gives the same lines either way.
    """
    from stream_rnn.producer import TokenProducer, produce_records
    from stream_rnn.registry.checkpoint import read_manifest
    from stream_rnn.stream.topics import ensure_topics
    from stream_rnn.train.data import read_records
    from stream_rnn.train.vocab import check_level

    settings = _topic_settings(tokens_topic=topic)
    address = bootstrap or settings.bootstrap
    if level is None:
        level = read_manifest(model_dir).vocab.get("level", "char") if model_dir else "char"
    records = read_records(data)
    ensure_topics(address, settings)
    started = time.monotonic()
    producer = TokenProducer(
        address,
        settings.tokens_topic,
        linger_ms=linger_ms,
        max_tokens=chunk,
        max_bytes=settings.max_message_bytes,
    )
    with producer:
        count = produce_records(
            records,
            producer,
            level=check_level(level),
            rate=rate,
            interleave_seed=interleave_seed,
        )
    elapsed = time.monotonic() - started
    messages = f" in {producer.sent} messages" if chunk > 1 else ""
    console.print(
        f"sent {count} events ({len(records)} sequences){messages} to {settings.tokens_topic} "
        f"in {elapsed:.2f}s ({count / max(elapsed, 1e-9):.0f} events/s)"
    )


@click.command("collect")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@_bootstrap_option
@click.option("--topic", default=None, help="predictions topic (default: stream-rnn.predictions)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="stop when no new prediction arrived for this many seconds")  # fmt: skip
@click.option("--max-wait", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="stop after this many seconds in any case")  # fmt: skip
@click.option("--isolation", type=click.Choice(["read_committed", "read_uncommitted"]),
              default="read_committed", show_default=True,
              help="read_committed: only committed transactions (each prediction once under "
              "exactly-once); read_uncommitted: also open and aborted ones")  # fmt: skip
def collect_cmd(
    out_path: str,
    bootstrap: str | None,
    topic: str | None,
    timeout: float,
    max_wait: float,
    isolation: str,
) -> None:
    """Read the predictions topic from the beginning into `score`-format JSONL (by key, seq)."""
    from stream_rnn.stream.collect import read_predictions, to_lines, write_lines

    settings = _topic_settings(predictions_topic=topic)
    preds = read_predictions(
        bootstrap or settings.bootstrap,
        settings.predictions_topic,
        timeout_s=timeout,
        max_wait_s=max_wait,
        isolation=isolation,
    )
    n = write_lines(out_path, to_lines(preds))
    console.print(f"collected {len(preds)} distinct predictions into {n} lines -> {out_path}")


@click.group("topics")
def topics_group() -> None:
    """Create the stream topics (tokens, its -state topic, predictions, dead letters)."""


@topics_group.command("create")
@_bootstrap_option
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="partitions of a new tokens topic (default: settings); checked if it exists")  # fmt: skip
@click.option("--topic", default=None, help="tokens topic (default: stream-rnn.tokens)")
@click.option("--predictions-topic", default=None, help="default: stream-rnn.predictions")
@click.option("--dead-letter-topic", default=None, help="default: stream-rnn.dead-letters")
def topics_create_cmd(
    bootstrap: str | None,
    partitions: int | None,
    topic: str | None,
    predictions_topic: str | None,
    dead_letter_topic: str | None,
) -> None:
    """Create the missing topics; idempotent. Prints one `name partitions` line per topic."""
    from stream_rnn.stream.topics import ensure_topics

    settings = _topic_settings(
        tokens_topic=topic,
        predictions_topic=predictions_topic,
        dead_letter_topic=dead_letter_topic,
    )
    layout = ensure_topics(bootstrap or settings.bootstrap, settings, partitions=partitions)
    for name in (layout.tokens, layout.state, layout.predictions, layout.dead_letters):
        click.echo(f"{name} {layout.partitions}")


@click.command("record")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="recorded sequences: JSONL that stream-rnn train reads (written atomically)")  # fmt: skip
@_bootstrap_option
@click.option("--topic", default=None, help="tokens topic (default: stream-rnn.tokens)")
@click.option("--since", default=None, metavar="ISO",
              help="window start, ISO 8601 (UTC unless it has an offset); default: log start")  # fmt: skip
@click.option("--last", default=None, metavar="DURATION",
              help="or the window starts this long ago: 90s, 30m, 2h, 1d, 1h30m")  # fmt: skip
@click.option("--until", default=None, metavar="ISO",
              help="window end, exclusive; default: the end of the topic when the command starts")  # fmt: skip
@click.option("--task", type=click.Choice(["next-token", "classify"]), default="next-token",
              show_default=True, help="classify keeps only sequences whose end carried a label")  # fmt: skip
@click.option("--min-tokens", type=click.IntRange(min=1), default=1, show_default=True,
              help="drop sequences with fewer tokens")  # fmt: skip
@click.option("--open", "open_policy", type=click.Choice(["keep", "drop"]), default="keep",
              show_default=True, help="sequences with no end in the window: keep or drop them")  # fmt: skip
def record_cmd(
    out_path: str,
    bootstrap: str | None,
    topic: str | None,
    since: str | None,
    last: str | None,
    until: str | None,
    task: str,
    min_tokens: int,
    open_policy: str,
) -> None:
    """Archive the tokens topic into recorded sequences for `stream-rnn train`.

    Reads every partition (committed transactions only) from --since/--last to --until or to
    the end offsets taken at start, cuts each key's tokens into sequences at `end`, and writes
    one JSON line per sequence. Malformed messages are counted, never fatal.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from stream_rnn.stream.record import record_topic, resolve_window, write_atomic

    window = resolve_window(since=since, last=last, until=until, now=time.time())
    settings = _topic_settings(tokens_topic=topic)
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # A transient bar on a terminal only: elsewhere rich would still leave a blank line
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        offsets = bar.add_task("record", total=None)
        recording = record_topic(
            bootstrap or settings.bootstrap,
            settings.tokens_topic,
            window,
            task=task,  # type: ignore[arg-type]  # click.Choice checked it
            min_tokens=min_tokens,
            open_policy=open_policy,  # type: ignore[arg-type]
            max_bytes=settings.max_message_bytes,
            progress=lambda done, total: bar.update(offsets, completed=done, total=total),
        )
    count = write_atomic(out_path, recording.records)
    for line in recording.summary():
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {count} sequences -> {out_path}", markup=False, highlight=False)
