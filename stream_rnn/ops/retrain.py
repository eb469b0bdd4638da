"""``stream-rnn retrain``: one retraining run against the registry, and a schedule repeating it.

A run reads the production version from the registry, gets recorded sequences (from the
tokens topic through the recorder, or from a JSONL file), trains a candidate with
`stream_rnn.train.retrain`, compares both on the most recent held-out rows and, when the
candidate is better by the margin (or forced), registers it with production as its parent,
promotes it and announces it. Whatever happens, it appends one JSON line to the retrain log
and, if asked, rewrites a Prometheus text file (`stream_rnn.ops.retrain_report`).

Example::

    job = RetrainJob(Path("runs/registry"), FileSource(Path("recorded.jsonl")), TrainConfig())
    result = run_once(job)
    print(summary_line(result.entry))
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stream_rnn.ops.retrain_report import append_log, json_safe, write_metrics_file
from stream_rnn.registry.checkpoint import load_checkpoint, read_manifest
from stream_rnn.registry.exceptions import AnnouncementError
from stream_rnn.registry.versions import Registry
from stream_rnn.stream.codec import DEFAULT_MAX_BYTES
from stream_rnn.train.data import Record, read_records
from stream_rnn.train.exceptions import RetrainError
from stream_rnn.train.retrain import (
    Comparison,
    compare,
    evaluate_records,
    known_labels,
    retrain_config,
    split_records,
    train_candidate,
)
from stream_rnn.train.trainer import Callback, TrainConfig, _device

# Announce(registry, version) -> whether workers were told (False: --no-announce); called under
# the registry's lock right after ``version`` was promoted.
Announce = Callable[[Registry, str], bool]
Say = Callable[[str], None]
LOG_NAME = "retrain.jsonl"


@dataclass(frozen=True)
class TopicSource:
    """Recorded sequences from the tokens topic, over the last ``last`` (None: whole log)."""

    bootstrap: str
    topic: str
    last: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class FileSource:
    """Recorded sequences from a JSONL file (either format `read_records` reads), in order."""

    path: Path


@dataclass(frozen=True)
class RetrainJob:
    """Everything a run needs; the same job is run again and again by `run_every`."""

    registry: Path
    source: TopicSource | FileSource
    train: TrainConfig
    holdout: float = 0.2
    valid: float = 0.1
    margin: float = 0.0
    force: bool = False
    from_scratch: bool = False
    policy: str = "rewarm"
    grad_dir: Path | None = None
    log_path: Path | None = None
    metrics_path: Path | None = None

    @property
    def log(self) -> Path:
        return self.log_path or self.registry / LOG_NAME


@dataclass
class RunResult:
    """The log entry of a run and, when it did not end cleanly, the error to report."""

    entry: dict[str, Any]
    error: Exception | None = None


@dataclass
class _Hooks:
    prepare_announce: Callable[[], Announce] | None
    callbacks: Sequence[Callback]
    say: Say


def run_once(
    job: RetrainJob,
    *,
    prepare_announce: Callable[[], Announce] | None = None,
    callbacks: Sequence[Callback] = (),
    say: Say = lambda _line: None,
) -> RunResult:
    """One retraining run; its entry is in the log (and the metrics file) when this returns.

    ``prepare_announce`` is called only once publishing is decided, before the registry
    changes (so a bad key or an unreachable broker changes nothing); None publishes without
    announcing. Errors never escape: a failed run is an entry with ``decision: failed`` and
    ``RunResult.error``. An interrupt (KeyboardInterrupt) is logged as failed and re-raised.
    """
    started, t0 = time.time(), time.monotonic()
    entry: dict[str, Any] = {
        "at": started,
        "decision": "failed",
        "reason": "",
        "registry": str(job.registry),
        "production": None,
        "version": None,
        "margin": job.margin,
        "force": job.force,
        "from_scratch": job.from_scratch,
        "policy": job.policy,
    }
    result = RunResult(entry)
    try:
        _run(job, entry, result, _Hooks(prepare_announce, callbacks, say))
    except KeyboardInterrupt:
        entry.update(decision="failed", reason="interrupted (signal)", error="KeyboardInterrupt")
        _finish(job, entry, t0)
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes a logged run
        entry.update(decision="failed", reason=str(err) or type(err).__name__)
        entry["error"] = type(err).__name__
        result.error = err
    _finish(job, entry, t0)
    return result


def _finish(job: RetrainJob, entry: dict[str, Any], t0: float) -> None:
    entry["duration_s"] = round(time.monotonic() - t0, 3)
    append_log(job.log, entry)
    if job.metrics_path is not None:
        write_metrics_file(job.metrics_path, job.log, entry)


def _run(job: RetrainJob, entry: dict[str, Any], result: RunResult, hooks: _Hooks) -> None:
    registry = Registry(job.registry)
    production = registry.production()
    if production is None:
        raise RetrainError(
            f"no production version in the registry at {registry.root}: retraining improves "
            "on one; publish one with `stream-rnn models publish MODEL_DIR --registry "
            f"{registry.root}`"
        )
    prod_dir = registry.path(production)
    manifest = read_manifest(prod_dir)
    task = str(manifest.model_config.get("task"))
    entry.update(production=production, parent_version=production, task=task)

    records, window = _load(job.source, task, hooks.say)
    entry["data_window"] = window
    records, dropped = known_labels(records, manifest)
    entry["rows"] = {"recorded": len(records) + dropped, "unknown_label": dropped}
    if not records:
        raise RetrainError(_no_data(window, dropped, task))
    split = split_records(records, job.holdout, valid=job.valid, seed=job.train.seed)
    entry["rows"].update(split.counts())
    cfg = retrain_config(job.train, manifest)
    hooks.say(
        f"retraining {production} ({task} {cfg.cell} {cfg.layers}x{cfg.hidden}) on "
        f"{len(split.train)} sequences (valid {len(split.valid)}, holdout {len(split.holdout)})"
        f"{' from scratch' if job.from_scratch else ''}, device {cfg.device}"
    )
    work = Path(tempfile.mkdtemp(prefix=".retrain-", dir=registry.root))
    try:
        trained = train_candidate(
            prod_dir, split, cfg, work, from_scratch=job.from_scratch, callbacks=hooks.callbacks
        )
        entry["best_epoch"] = trained.best_epoch
        device = _device(cfg.device)
        cand_model, cand_manifest = load_checkpoint(work, device=device)
        prod_model, prod_manifest = load_checkpoint(prod_dir, device=device)
        size, max_len = max(cfg.batch_size, 64), cfg.max_len
        cand = evaluate_records(
            cand_model, cand_manifest, split.holdout, batch_size=size, max_len=max_len
        )
        prod = evaluate_records(
            prod_model, prod_manifest, split.holdout, batch_size=size, max_len=max_len
        )
        verdict = compare(task, cand, prod, job.margin)
        entry.update(
            candidate=cand_manifest.version,
            metric=verdict.metric,
            higher_is_better=verdict.higher_is_better,
            improvement=verdict.improvement,
            candidate_metrics=cand.as_dict(task),
            production_metrics=prod.as_dict(task),
        )
        if job.grad_dir is not None:
            from stream_rnn.train.gradients import model_gradient_report

            model_gradient_report(str(work), split.valid, str(job.grad_dir))
        if cand_manifest.version == production:
            entry["reason"] = (
                "the candidate's weights are identical to production's: nothing was learned "
                "(check --lr and --epochs)"
            )
            entry["decision"] = "kept"
            return
        if not verdict.better and not job.force:
            entry.update(decision="kept", reason=f"not better: {verdict.describe()}")
            return
        _publish(job, registry, work, entry, result, hooks, verdict)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(
    job: RetrainJob,
    registry: Registry,
    work: Path,
    entry: dict[str, Any],
    result: RunResult,
    hooks: _Hooks,
    verdict: Comparison,
) -> None:
    production = entry["production"]
    announce = hooks.prepare_announce() if hooks.prepare_announce is not None else None
    metrics = {
        "holdout": entry["candidate_metrics"],
        "production_holdout": entry["production_metrics"],
        "baseline_version": production,
        "primary_metric": entry["metric"],
        "improvement": entry["improvement"],
        "margin": job.margin,
        "forced": job.force,
    }
    # The check, the promotion and the announcement under one lock: an operator's rollback
    # racing this run lands before or after all three, and the pointer and the last
    # announcement name the same version.
    with registry.locked():
        now = registry.production()
        if now != production:
            raise RetrainError(
                f"production moved from {production} to {now} while this run trained; a "
                f"candidate trained from {production} is not published over it: run again"
            )
        manifest = registry.add(
            work,
            data_window=json_safe(entry["data_window"]),
            metrics=json_safe(metrics),
            parent_version=production,
        )
        registry.promote(manifest.version, policy=job.policy)
        told = "better" if verdict.better else "forced (--force), although not better"
        reason = f"{told}: {verdict.describe()}"
        entry.update(decision="published", version=manifest.version, reason=reason)
        if announce is None:
            entry["announced"] = False
            return
        try:
            entry["announced"] = announce(registry, manifest.version)
        except AnnouncementError as err:
            entry.update(announced=False, error=type(err).__name__, announce_error=str(err))
            result.error = err


def _load(
    source: TopicSource | FileSource, task: str, say: Say
) -> tuple[list[Record], dict[str, Any]]:
    if isinstance(source, FileSource):
        path = source.path.absolute()
        records = read_records(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return records, {"source": "file", "path": str(path), "sha256": digest}
    from stream_rnn.stream.record import record_topic, resolve_window

    if task not in ("next-token", "classify"):
        raise RetrainError(
            f"the production model is a {task} model; the tokens topic records next-token "
            "and classify sequences only: retrain it with --data FILE"
        )
    now = time.time()
    window = resolve_window(since=None, last=source.last, until=None, now=now)
    recording = record_topic(
        source.bootstrap,
        source.topic,
        window,
        task=task,  # type: ignore[arg-type]  # checked just above
        max_bytes=source.max_bytes,
    )
    for line in recording.summary():
        say(line)
    return recording.records, {
        "source": "topic",
        "bootstrap": source.bootstrap,
        "topic": source.topic,
        "last": source.last,
        **asdict(window),
        "until_ms": window.until_ms if window.until_ms is not None else int(now * 1000),
        "describe": window.describe(),
    }


def _no_data(window: dict[str, Any], dropped: int, task: str) -> str:
    where = (
        f"topic {window['topic']!r} at {window['bootstrap']}, window {window['describe']}"
        if window["source"] == "topic"
        else f"{window['path']}"
    )
    if dropped:
        return (
            f"no usable sequences in {where}: all {dropped} carry labels the production model "
            "does not know (retraining keeps its label set); publish a model with those labels"
        )
    hint = (
        "; classify needs `end` events that carry a label"
        if task == "classify" and window["source"] == "topic"
        else ""
    )
    return f"no recorded sequences in {where}{hint}: widen --last or check the producers"


def run_every(
    interval_s: float,
    run: Callable[[], object],
    stop: threading.Event,
    *,
    tick_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Call ``run()`` now and then every ``interval_s`` (start to start) until ``stop`` is set.

    A run longer than the interval is followed at once by the next. Waiting happens in steps
    of at most ``tick_s`` on ``stop``, so a stop (from a signal handler) ends the wait at once
    and the loop only ever stops between runs. Returns how many runs were made.
    """
    runs = 0
    while not stop.is_set():
        started = clock()
        run()
        runs += 1
        next_at = started + interval_s
        while not stop.is_set():
            left = next_at - clock()
            if left <= 0:
                break
            stop.wait(min(tick_s, left))
    return runs
