"""The live system of ``stream-rnn demo``: a local broker, a registry, and two stream workers.

`LiveSystem` owns everything the demo starts in its directory: a Kafka broker (KRaft,
127.0.0.1, data in ``DIR/kafka``), a model registry (``DIR/registry``) with a fresh signing key
(``DIR/update.key``, mode 600), the stream topics of this run, exactly-once workers of one
group that serve the registry's production version and hot-swap announced ones, and the
``stream-rnn record`` / ``retrain`` jobs run against them. It is a context manager: leaving
the block for any reason (the end, an error, Ctrl-C) stops the jobs, the workers (SIGTERM,
then SIGKILL) and the broker.

Example::

    with LiveSystem(Path("runs/demo/stream"), say=print) as live:
        live.start_broker()
        live.publish(Path("runs/demo/v1"))
        live.start_workers(["worker-1", "worker-2"])
        ...  # replay into live.topics, live.kill("worker-2"), ...
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess  # noqa: S404 - only for TimeoutExpired
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import (
    ManagedProcess,
    ProcessExitedError,
    ProcessWaitTimeout,
    WorkerHandle,
    find_free_port,
)
from stream_rnn.ops.settings import Settings
from stream_rnn.registry.updates import build_update, load_update_key, publish_update, sign
from stream_rnn.registry.versions import Registry
from stream_rnn.replay.kafka import ReplayTopics
from stream_rnn.stream.topics import ensure_topics

PARTITIONS = 4
WORKER_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
# Workers of the demo: a short session timeout, so that the survivor of a SIGKILL takes the
# dead worker's partitions over after ~6 s instead of 10 (Kafka's floor is 6 s); one torch
# thread each, as the two workers, the broker and the replay share the machine's cores.
WORKER_ENV = {
    "STREAM_RNN_SESSION_TIMEOUT_S": "6",
    "STREAM_RNN_HEARTBEAT_INTERVAL_S": "2",
    "OMP_NUM_THREADS": "1",
}


# Here rather than in ops/exceptions.py: only the demo raises it.
class DemoError(OpsError):
    """A stage of the demo failed; the message names the stage and the log to read."""


@dataclass
class Worker:
    """One worker process of the demo's group, by its name in the demo's output."""

    name: str
    handle: WorkerHandle
    metrics_port: int
    started_at: float

    @property
    def pid(self) -> int:
        return self.handle.pid

    def status(self) -> dict[str, Any] | None:
        return self.handle.status()


class LiveSystem:
    """Broker, registry, topics and workers of one demo run (see the module docstring)."""

    def __init__(self, work_dir: Path, *, say: Callable[[str], None]) -> None:
        self.dir = work_dir
        self.say = say
        self.run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.topics = ReplayTopics(
            f"{self.run}.tokens", f"{self.run}.predictions", f"{self.run}.dead-letters"
        )
        self.updates_topic = f"{self.run}.model-updates"
        self.group = self.run
        self.registry = Registry(work_dir / "registry")
        self.key_file = work_dir / "update.key"
        self.logs = work_dir / "logs"
        self.kafka = LocalKafka(work_dir / "kafka")
        self.bootstrap = ""
        self.workers: dict[str, Worker] = {}
        self._stopped: list[WorkerHandle] = []
        self._jobs: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._closed = False
        self._broker_started = False

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> LiveSystem:
        self._fresh_dir()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fresh_dir(self) -> None:
        """Everything of an earlier run goes, except the broker's data directory (a broker
        formats once; this run's topics have names of their own)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            if path.name == "kafka":
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.logs.mkdir()

    def start_broker(self) -> str:
        """Start the local broker and create this run's stream topics; the bootstrap address."""
        info = self.kafka.start()
        self._broker_started = True
        self.bootstrap = info.bootstrap
        ensure_topics(
            self.bootstrap,
            Settings(
                tokens_topic=self.topics.tokens,
                predictions_topic=self.topics.predictions,
                dead_letter_topic=self.topics.dead_letters,
            ),
            partitions=PARTITIONS,
        )
        return self.bootstrap

    def create_key(self) -> Path:
        """A fresh random HMAC key for the announcements, readable by its owner only."""
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        self.key_file.chmod(0o600)  # whatever the umask did
        return self.key_file

    def publish(self, model_dir: Path) -> str:
        """Register ``model_dir``, make it production and announce it, signed (as
        ``stream-rnn models publish --policy keep --update-key-file KEY`` does)."""
        manifest = self.registry.add(model_dir)
        self.registry.promote(manifest.version)
        update = build_update(self.registry.path(manifest.version), policy="keep")
        update = sign(update, load_update_key(self.key_file))
        publish_update(self.bootstrap, update, self.updates_topic)
        return manifest.version

    # ------------------------------------------------------------------ workers
    def worker_args(self) -> list[str]:
        return [
            "--registry", str(self.registry.root), "--update-key-file", str(self.key_file),
            "--bootstrap", self.bootstrap, "--group", self.group,
            "--topic", self.topics.tokens, "--predictions-topic", self.topics.predictions,
            "--dead-letter-topic", self.topics.dead_letters, "--partitions", str(PARTITIONS),
            "--guarantee", "exactly-once", "--swap-policy", "keep",
        ]  # fmt: skip

    def start_worker(self, name: str) -> Worker:
        """Start the worker ``name`` (a new process; returns at once)."""
        with self._lock:
            if self._closed:
                raise DemoError(f"not starting {name}: the demo is shutting down")
            used = frozenset(
                p for w in self.workers.values() for p in (w.handle.port, w.metrics_port)
            )
            web = find_free_port(used)
            metrics = find_free_port(used | {web})
            env = {
                **WORKER_ENV,
                "STREAM_RNN_WORKER_DIR": str(self.dir / "workers"),
                "STREAM_RNN_MODEL_UPDATES_TOPIC": self.updates_topic,
            }
            log = self.logs / f"{name}-{len(self._stopped) + len(self.workers)}.log"
            args = [*self.worker_args(), "--metrics-port", str(metrics)]
            handle = WorkerHandle(args, web, log, env=env)
            worker = Worker(name, handle, metrics, time.monotonic())
            self.workers[name] = worker
            return worker

    def wait_assigned(
        self, names: Sequence[str], *, every: bool = False, timeout: float = WORKER_START_TIMEOUT_S
    ) -> None:
        """Wait until each of ``names`` owns partitions (``every``: together, all of them)."""
        deadline = time.monotonic() + timeout
        for name in names:
            worker = self.workers[name]
            try:
                worker.handle.wait_until(
                    lambda s: bool(s.get("assigned")),
                    "partitions assigned",
                    max(1.0, deadline - time.monotonic()),
                )
            except (ProcessExitedError, ProcessWaitTimeout) as err:
                raise DemoError(
                    f"{name} (pid {worker.pid}) did not get partitions: {err}"
                ) from None
        while every and len(self.assigned(names)) < PARTITIONS:
            if time.monotonic() >= deadline:
                raise DemoError(
                    f"{', '.join(names)} own partitions {sorted(self.assigned(names))} of "
                    f"{PARTITIONS} after {timeout:.0f}s; see the logs in {self.logs}"
                )
            time.sleep(0.2)

    def assigned(self, names: Sequence[str]) -> set[int]:
        """The partitions that ``names`` report owning now."""
        out: set[int] = set()
        for name in names:
            status = self.workers[name].status() if name in self.workers else None
            out |= set(status.get("assigned") or ()) if status else set()
        return out

    def kill(self, name: str) -> int:
        """SIGKILL the worker ``name`` at once, as a crash would; its pid."""
        with self._lock:
            worker = self.workers.pop(name)
            self._stopped.append(worker.handle)
        worker.handle.kill()
        return worker.pid

    # ------------------------------------------------------------------ jobs
    def run_job(
        self,
        args: Sequence[str],
        name: str,
        *,
        tick: Callable[[], None] = lambda: time.sleep(0.5),
        timeout: float = JOB_TIMEOUT_S,
    ) -> None:
        """Run ``stream-rnn ARGS`` to its end at a lower CPU priority (nice 10: the workers
        keep serving while it trains), calling ``tick`` while it runs (which may raise to stop
        it); `DemoError` if it failed. Its output is in ``logs/NAME.log``."""
        log = self.logs / f"{name}.log"
        argv = [sys.executable, "-m", "stream_rnn", *args]
        if shutil.which("nice") is not None:
            argv = ["nice", "-n", "10", *argv]
        with self._lock:
            if self._closed:
                raise DemoError(f"not running {name}: the demo is shutting down")
            job = ManagedProcess(argv, log, env={"OMP_NUM_THREADS": "1"}, name=name)
            self._jobs.append(job)
        deadline = time.monotonic() + timeout
        try:
            while job.alive():
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"`stream-rnn {args[0]}` ran longer than {timeout:.0f}s; see {log}"
                    )
                tick()
        finally:
            job.stop(timeout=5)
        if job.returncode != 0:
            raise DemoError(
                f"`stream-rnn {args[0]}` failed (exit status {job.returncode}); see {log}:\n"
                f"{job.log_tail(20)}"
            )

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop every job, every worker (gracefully, then SIGKILL) and the broker."""
        with self._lock:
            self._closed = True
            jobs, workers = list(self._jobs), list(self.workers.values())
        for job in jobs:
            job.stop(timeout=5)
        # SIGTERM to all first, so that the workers shut down side by side
        for worker in workers:
            if worker.handle.alive():
                worker.handle.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                code = worker.handle.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = worker.handle.kill()
            self._stopped.append(worker.handle)
            self.say(f"stopped {worker.name} (pid {worker.pid}, exit status {code})")
        self.workers.clear()
        if self._broker_started:
            self.kafka.stop()
            self._broker_started = False
            self.say(f"stopped the Kafka broker (data in {self.kafka.data_dir})")
