"""The faust app around a `StreamWorker`, and running one worker process until it is stopped.

`build_app` wires the worker into faust-streaming (the tokens agent, rebalance signals, timers,
the status page, the model follower); `run_worker` creates the topics, builds the worker and the
app and runs them until SIGTERM/SIGINT. See `stream_rnn.stream.worker` for the protocol.

Example::

    settings = get_settings()
    opts = WorkerOptions.from_settings("runs/lang", settings, group="g1", max_batch=512)
    run_worker(opts, settings)          # until SIGTERM / SIGINT
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import faust
from faust.types import TP, StreamT
from prometheus_client import CollectorRegistry

from stream_rnn.ops.processes import pid_alive
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.exceptions import REJECT_REASONS
from stream_rnn.registry.keys import UpdateKey, load_update_key
from stream_rnn.stream import faust_boundary as fb
from stream_rnn.stream.batches import consume_batches
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.follow import ModelFollower, StartupChoice, startup_model
from stream_rnn.stream.reasons import REASONS
from stream_rnn.stream.sensors import MetricsCollector, MetricsServer
from stream_rnn.stream.status import StatusServer
from stream_rnn.stream.topics import ensure_topics
from stream_rnn.stream.worker import StreamWorker
from stream_rnn.stream.worker_options import WorkerOptions

__all__ = ["build_app", "remove_stale_dirs", "run_worker"]

log = logging.getLogger("stream_rnn.worker")
LAG_INTERVAL_S = 1.0  # how often the consumer lag of /metrics and the status is refreshed


def build_app(opts: WorkerOptions, worker: StreamWorker | None = None) -> faust.App:
    """The faust app of one worker process (not started); loads the model unless given one."""
    worker = worker or StreamWorker(opts)
    datadir = opts.worker_dir / f"{opts.group}-{os.getpid()}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        opts.group,  # the app id is the consumer group
        broker=f"kafka://{opts.bootstrap}",
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        # Topics are created by ensure_topics (with the state topic co-partitioned); faust
        # must neither declare them nor create its assignor leader topic.
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=opts.web_port is not None,
        web_port=opts.web_port or 6066,
        web_host=opts.web_host,
        web_bind=opts.web_host,
        consumer_auto_offset_reset="earliest",
        # No faust tables (states live in our state topic), so no standby replicas: with the
        # default of 1, faust's assignor keeps members at ceil(P / members) partitions, and a
        # third worker joining two on 4 partitions would get none.
        table_standby_replicas=0,
        stream_buffer_maxsize=max(4096, 2 * opts.max_batch),
        producer_acks=-1,
        # How long a killed worker keeps its partitions: the group moves them only once its
        # session expires, so this bounds the recovery time after a crash.
        broker_session_timeout=opts.session_timeout_s,
        broker_heartbeat_interval=min(opts.heartbeat_interval_s, opts.session_timeout_s / 3),
    )
    worker.generation = lambda: fb.generation_id(app)

    async def commit_offsets(offsets: dict[int, int]) -> bool:
        return await fb.commit_offsets(app, opts.tokens_topic, offsets)

    worker.commit_offsets = commit_offsets
    if opts.web_port is not None:

        def status() -> dict[str, Any]:
            stats = fb.bulk_stats(app)
            return {**worker.status(), "consume": stats.as_dict() if stats else None}

        app.web_server(StatusServer(status, port=opts.web_port, host=opts.web_host))
    if opts.metrics_port is not None:
        registry = CollectorRegistry()
        registry.register(
            MetricsCollector(
                worker.sensor,
                worker.live_figures,
                dead_letter_reasons=REASONS,
                rejection_reasons=REJECT_REASONS,
            )
        )
        if opts.faust_metrics:
            fb.use_faust_metrics(app, registry)
        # its own thread, started by run_worker (faust hosts one web server: the status page)
        worker.metrics_server = MetricsServer(
            registry, port=opts.metrics_port, host=opts.metrics_host
        )
    topic = app.topic(
        opts.tokens_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        acks=False,  # offsets are committed by commit_point, see the module docstring
    )
    # Fetched record batches of the tokens topic go to the agent's queue in bulk, not through
    # faust's per-message wait_first (flow control and rebalances kept: see faust_boundary).
    fb.use_bulk_consumer(app, [opts.tokens_topic])

    @app.agent(topic, name="tokens")
    async def process_tokens(stream: StreamT[bytes]) -> None:
        await worker.start_clients()
        # Micro-batches taken from the agent's channel queue in bulk (see stream/batches.py):
        # nothing is acked (acks are off for the topic); offsets are committed at commit_point,
        # started in the background after each batch so that a commit never holds up the next.
        await consume_batches(
            fb.channel_queue(stream),
            opts.max_batch,
            opts.max_wait_s,
            worker.handle,
            worker.commit_point,
            stopping=lambda: worker.stopping,
        )

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        partitions = sorted(tp.partition for tp in assigned if tp.topic == opts.tokens_topic)
        await worker.on_assigned(partitions)
        log.info(
            "worker %d assigned partitions %s of %s", os.getpid(), partitions, opts.tokens_topic
        )

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        await worker.on_revoked(
            sorted(tp.partition for tp in revoked if tp.topic == opts.tokens_topic)
        )

    tick = min(opts.commit_interval_s if worker.exactly_once else 1.0, 1.0) / 2

    @app.timer(tick)
    async def commit_when_idle() -> None:
        # Without new micro-batches the last ones would wait for their commit until the next
        # batch or shutdown.
        await worker.commit_point()

    @app.timer(opts.expire_interval_s)
    async def expire_idle_keys() -> None:
        await worker.expire_when_idle()

    @app.timer(opts.stats_interval_s)
    async def log_stats() -> None:
        worker.log_stats()

    @app.timer(LAG_INTERVAL_S)
    async def refresh_lag() -> None:
        worker.refresh_lag(fb.highwaters(app, opts.tokens_topic))
        worker.trim_when_idle()

    if opts.registry is not None:
        follower = ModelFollower(
            opts.bootstrap,
            opts.model_updates_topic,
            key=worker_update_key(opts),
            registry=opts.registry,
            allow_unsigned=opts.allow_unsigned_updates,
            after_seq=opts.update_seq,
            current=lambda: worker.engine.manifest,
            apply=worker.swap_model,
            rejected=worker.update_rejected,
            client_id=f"{opts.group}-{os.getpid()}-models",
            device=str(worker.engine.device),
        )

        @app.task
        async def follow_models() -> None:
            await follower.run()

    @app.on_before_shutdown.connect
    async def stop_worker(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await worker.shutdown()

    return app


def run_worker(opts: WorkerOptions, settings: Settings) -> int:
    """Create the topics if needed, then run one worker until SIGTERM/SIGINT; the exit code."""
    if opts.registry is not None:
        worker_update_key(opts)  # no key and no --allow-unsigned-updates: stop before anything
    layout = ensure_topics(opts.bootstrap, opts.settings(settings), partitions=opts.partitions)
    for mismatch in fb.check_versions():
        log.warning("untested version: %s; the worker relies on its internals", mismatch)
    choice = None
    if opts.registry is not None:
        opts, choice = start_from_registry(opts)
    removed = remove_stale_dirs(opts.worker_dir)
    if removed:
        log.info("removed %d local state files of workers that are gone", removed)
    # the model verified at start-up is served as it was loaded (no second read of its files)
    worker = StreamWorker(opts, loaded=choice.loaded if choice is not None else None)
    if choice is not None and choice.policy is not None:
        worker.follow_policy(choice.policy)  # restored states of older versions get it
    if opts.startup_refusal is not None:
        worker.sensor.on_startup_refusal(opts.startup_refusal.partition(":")[0])
    app = build_app(opts, worker)
    log.info(
        "worker %d: model %s on %s, group %r, %s (%d partitions) -> %s, %s",
        os.getpid(), worker.engine.version, worker.engine.device, opts.group, layout.tokens,
        layout.partitions, layout.predictions, layout.dead_letters,
    )  # fmt: skip
    faust_worker = faust.Worker(app, loglevel=opts.log_level, quiet=True, redirect_stdouts=False)
    if worker.metrics_server is not None:
        worker.metrics_server.start()  # a taken port ends the start here, with its message
    gc.freeze()  # start-up objects (model, engine, app) leave the GC's generations: +19% tokens/s
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        if worker.metrics_server is not None:
            worker.metrics_server.stop()
        worker.close()
        shutil.rmtree(opts.worker_dir / f"{opts.group}-{os.getpid()}", ignore_errors=True)
    return 0


def worker_update_key(opts: WorkerOptions) -> UpdateKey | None:
    """The key a registry worker verifies announcements with; `StreamError` when it has none
    and unsigned updates are not explicitly allowed (it would follow anyone's announcements)."""
    if opts.update_key_file is not None:
        return load_update_key(opts.update_key_file)
    if not opts.allow_unsigned_updates:
        raise StreamError(
            f"a worker that follows the registry {opts.registry} needs --update-key-file (the "
            "Ed25519 update.pub of `stream-rnn models keygen`, or the HMAC secret) to verify "
            "model updates; pass --allow-unsigned-updates (STREAM_RNN_ALLOW_UNSIGNED_UPDATES=1) "
            "only if anyone who can write the updates topic may choose the served model"
        )
    return None


def start_from_registry(opts: WorkerOptions) -> tuple[WorkerOptions, StartupChoice]:
    """``opts`` with the registry version to serve first, verified (`startup_model`), and
    that choice (the loaded model, the policy announced with it)."""
    key = worker_update_key(opts)
    if key is None:
        log.warning(
            "--allow-unsigned-updates: unsigned model updates on %s are accepted; anyone who "
            "can write that topic chooses the model this worker serves",
            opts.model_updates_topic,
        )
    assert opts.registry is not None  # noqa: S101 - the caller checked
    choice = startup_model(
        opts.registry, opts.bootstrap, opts.model_updates_topic, key=key,
        allow_unsigned=opts.allow_unsigned_updates, device=opts.device,
    )  # fmt: skip
    log.info(
        "serving %s (%s); following %s", choice.version, choice.source, opts.model_updates_topic
    )
    refusal = choice.refusal
    chosen = replace(
        opts,
        model_dir=choice.model_dir,
        update_seq=choice.seq,
        startup_refusal=f"{refusal.reason}: {refusal.detail}" if refusal else None,
        serving_fallback=choice.fallback,
    )
    return chosen, choice


def remove_stale_dirs(worker_dir: Path) -> int:
    """Remove the local directories (``<group>-<pid>``) of worker processes that no longer run.

    A worker removes its own at exit; one that was killed cannot, and its evicted-state cache
    would stay on disk forever. The state topic is the truth, so nothing is lost.
    """
    removed = 0
    if not worker_dir.is_dir():
        return 0
    for path in worker_dir.iterdir():
        pid_text = path.name.rpartition("-")[2]
        if not path.is_dir() or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
