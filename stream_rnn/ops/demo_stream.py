"""The live system of ``stream-rnn demo``: a local broker, a registry, and two stream workers.

`LiveSystem` owns everything the demo starts in its directory: a Kafka broker (KRaft,
127.0.0.1, data in ``DIR/kafka``), a model registry (``DIR/registry``) with a fresh signing key
(``DIR/update.key``, mode 600), the stream topics of this run, exactly-once workers of one
group that serve the registry's production version and hot-swap announced ones (rewarming
live states from a per-key token history), and the ``stream-rnn record`` / ``train`` /
``models publish`` jobs run against them. It is a context manager: leaving
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
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.kafka_local import LocalKafka
from stream_rnn.ops.processes import ManagedProcess
from stream_rnn.ops.settings import Settings
from stream_rnn.ops.workers import (
    WORKER_START_TIMEOUT_S,
    Worker,
    WorkerGroup,
    WorkerGroupError,
)
from stream_rnn.registry.versions import Registry
from stream_rnn.replay.kafka import ReplayTopics
from stream_rnn.stream.topics import ensure_topics

__all__ = ["JOB_TIMEOUT_S", "PARTITIONS", "DemoError", "LiveSystem", "Worker"]

PARTITIONS = 4
# tokens each key keeps so that a swap can rewarm its state (v2 has another vocabulary: a keep
# is impossible); more than the scenario's longest sequence, so a rewarm replays all of it
HISTORY = 128
JOB_TIMEOUT_S = 300.0


# Here rather than in ops/exceptions.py: only the demo raises it.
class DemoError(OpsError):
    """A stage of the demo failed; the message names the stage and the log to read."""


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
        self.worker_group = WorkerGroup(
            self.logs,
            env={
                "STREAM_RNN_WORKER_DIR": str(work_dir / "workers"),
                "STREAM_RNN_MODEL_UPDATES_TOPIC": self.updates_topic,
            },
        )
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

    def publish(
        self,
        model_dir: Path,
        policy: str = "keep",
        *,
        tick: Callable[[], None] = lambda: time.sleep(0.2),
    ) -> str:
        """Register ``model_dir``, make it production and announce it, signed: ``stream-rnn
        models publish --policy POLICY --update-key-file KEY`` (what an operator runs); its
        version."""
        from stream_rnn.registry.checkpoint import read_manifest

        self.run_job(
            ["models", "publish", str(model_dir), "--registry", str(self.registry.root),
             "--bootstrap", self.bootstrap, "--topic", self.updates_topic,
             "--update-key-file", str(self.key_file), "--policy", policy],
            f"publish-{model_dir.name}", tick=tick,
        )  # fmt: skip
        return read_manifest(model_dir).version

    # ------------------------------------------------------------------ workers
    @property
    def workers(self) -> dict[str, Worker]:
        """The running workers by name."""
        return self.worker_group.workers

    def worker_args(self) -> list[str]:
        return [
            "--registry", str(self.registry.root), "--update-key-file", str(self.key_file),
            "--bootstrap", self.bootstrap, "--group", self.group,
            "--topic", self.topics.tokens, "--predictions-topic", self.topics.predictions,
            "--dead-letter-topic", self.topics.dead_letters, "--partitions", str(PARTITIONS),
            "--guarantee", "exactly-once", "--history", str(HISTORY), "--swap-policy", "rewarm",
        ]  # fmt: skip

    def start_worker(self, name: str) -> Worker:
        """Start the worker ``name`` (a new process; returns at once)."""
        if self._closed:
            raise DemoError(f"not starting {name}: the demo is shutting down")
        try:
            return self.worker_group.start(name, self.worker_args())
        except WorkerGroupError as err:
            raise DemoError(str(err)) from None

    def wait_assigned(
        self, names: Sequence[str], *, every: bool = False, timeout: float = WORKER_START_TIMEOUT_S
    ) -> None:
        """Wait until each of ``names`` owns partitions (``every``: together, all of them)."""
        try:
            self.worker_group.wait_assigned(
                names, partitions=PARTITIONS, every=every, timeout=timeout
            )
        except WorkerGroupError as err:
            raise DemoError(str(err)) from None

    def assigned(self, names: Sequence[str]) -> set[int]:
        """The partitions that ``names`` report owning now."""
        return self.worker_group.assigned(names) if names else set()

    def kill(self, name: str) -> int:
        """SIGKILL the worker ``name`` at once, as a crash would; its pid."""
        return self.worker_group.kill(name)

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
            jobs = list(self._jobs)
        for job in jobs:
            job.stop(timeout=5)
        self.worker_group.close(self.say)
        if self._broker_started:
            self.kafka.stop()
            self._broker_started = False
            self.say(f"stopped the Kafka broker (data in {self.kafka.data_dir})")
