"""Stream workers of one consumer group that this process starts, kills and stops itself.

`WorkerGroup` is what ``stream-rnn demo`` and ``stream-rnn replay --workers N`` share: each
worker is a ``python -m stream_rnn worker`` child (`stream_rnn.ops.processes.WorkerHandle`) with
a status port and a metrics port of its own, its output in ``LOGS/NAME-K.log`` (K counts the
processes of the group, so a restarted worker gets a new log). A worker can be SIGKILLed (a
crash: no revocation, no final commit), stopped gracefully (SIGTERM: it commits and leaves the
group) and started again under its name; `WorkerGroup.replace_exited` starts again those that
exited by themselves, as a supervisor would. `WorkerGroup.close` stops every worker still
running (SIGTERM to all, then SIGKILL to those that outlive ``STOP_TIMEOUT_S``).

Example::

    group = WorkerGroup(Path("runs/replay/logs"), env={"STREAM_RNN_WORKER_DIR": "/tmp/w"})
    try:
        for name in ("worker-1", "worker-2"):
            group.start(name, ["--model", "runs/lang", "--bootstrap", bootstrap, "--group", "g"])
        group.wait_assigned(["worker-1", "worker-2"], partitions=4)
        group.kill("worker-2")
    finally:
        group.close(say=print)
"""

from __future__ import annotations

import signal
import subprocess  # noqa: S404 - only for TimeoutExpired
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from stream_rnn.ops.exceptions import OpsError
from stream_rnn.ops.processes import (
    ProcessExitedError,
    ProcessWaitTimeout,
    WorkerHandle,
    find_free_port,
)

WORKER_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2
# Workers of a group this process runs on one machine: a short session timeout, so that the
# survivors of a SIGKILL take the dead worker's partitions over after ~6 s instead of 10
# (Kafka's floor is 6 s); one torch thread each, as the workers, the broker and the process
# that drives them share the machine's cores.
WORKER_ENV = {
    "STREAM_RNN_SESSION_TIMEOUT_S": "6",
    "STREAM_RNN_HEARTBEAT_INTERVAL_S": "2",
    "OMP_NUM_THREADS": "1",
}


class WorkerGroupError(OpsError):
    """A worker of the group did not start, did not get partitions, or is unknown."""


@dataclass
class Worker:
    """One worker process of the group, by its name."""

    name: str
    handle: WorkerHandle
    metrics_port: int
    started_at: float

    @property
    def pid(self) -> int:
        return self.handle.pid

    def status(self) -> dict[str, Any] | None:
        return self.handle.status()


class WorkerGroup:
    """Worker processes started by this process (see the module docstring).

    ``env`` is added to each worker's environment on top of `WORKER_ENV`; ``logs`` is
    created if missing. Safe to use from two threads (a controller and the main thread).
    """

    def __init__(self, logs: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.logs = logs
        self.env = {**WORKER_ENV, **(env or {})}
        self.workers: dict[str, Worker] = {}
        self.stopped: list[Worker] = []  # killed, removed, exited or closed, in that order
        self._replaced: dict[str, int] = {}  # name -> times started again after an exit
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ start
    def start(self, name: str, args: Sequence[str]) -> Worker:
        """Start the worker ``name`` with ``stream-rnn worker ARGS`` (returns at once)."""
        with self._lock:
            if self._closed:
                raise WorkerGroupError(f"not starting {name}: the workers are shutting down")
            if name in self.workers:
                raise WorkerGroupError(f"{name} runs already (pid {self.workers[name].pid})")
            return self._start(name, args)

    def _start(self, name: str, args: Sequence[str]) -> Worker:  # holding the lock
        self.logs.mkdir(parents=True, exist_ok=True)
        used = frozenset(p for w in self.workers.values() for p in (w.handle.port, w.metrics_port))
        web = find_free_port(used)
        metrics = find_free_port(used | {web})
        log = self.logs / f"{name}-{len(self.stopped) + len(self.workers)}.log"
        handle = WorkerHandle([*args, "--metrics-port", str(metrics)], web, log, env=self.env)
        worker = Worker(name, handle, metrics, time.monotonic())
        self.workers[name] = worker
        return worker

    def replace_exited(
        self, args: Sequence[str], *, limit: int
    ) -> list[tuple[Worker, Worker | None]]:
        """Start again, under its name and with ``ARGS``, every running worker that exited by
        itself, as a supervisor would, at most ``limit`` times per name; ``(the worker that
        exited, the new one or None past the limit)`` for each."""
        out: list[tuple[Worker, Worker | None]] = []
        with self._lock:
            if self._closed:
                return out
            for name, worker in list(self.workers.items()):
                if worker.handle.alive():
                    continue
                del self.workers[name]
                self.stopped.append(worker)
                self._replaced[name] = self._replaced.get(name, 0) + 1
                new = self._start(name, args) if self._replaced[name] <= limit else None
                out.append((worker, new))
        return out

    # ------------------------------------------------------------------ partitions
    def assigned(self, names: Sequence[str] | None = None) -> set[int]:
        """The partitions that ``names`` (default: every running worker) report owning now."""
        with self._lock:
            wanted = list(self.workers) if names is None else names
            chosen = [self.workers[n] for n in wanted if n in self.workers]
        out: set[int] = set()
        for worker in chosen:
            status = worker.status()
            out |= set(status.get("assigned") or ()) if status else set()
        return out

    def wait_assigned(
        self,
        names: Sequence[str],
        *,
        partitions: int,
        every: bool = True,
        timeout: float = WORKER_START_TIMEOUT_S,
        halted: Callable[[], bool] = lambda: False,
        fail_on_exit: bool = True,
    ) -> None:
        """Wait until each of ``names`` owns partitions and, with ``every``, until they own all
        ``partitions`` together. A worker beyond the partition count gets none: it only has
        to answer its status then. `WorkerGroupError` on a timeout or an exit (of any running
        worker with ``fail_on_exit``, else of one of ``names`` while it waits for it to get
        partitions); ``halted`` (checked at every poll) ends the wait early with
        `WorkerGroupError` too."""
        deadline = time.monotonic() + timeout
        # more workers than partitions: some get none, and answering their status is enough
        spare = len(self.workers) > partitions
        for name in names:
            worker = self.workers.get(name)
            if worker is None:
                raise WorkerGroupError(f"{name} does not run (any more)")
            try:
                worker.handle.wait_until(
                    lambda s: bool(s.get("assigned")) or spare,
                    "partitions assigned",
                    max(1.0, deadline - time.monotonic()),
                )
            except (ProcessExitedError, ProcessWaitTimeout) as err:
                raise WorkerGroupError(
                    f"{name} (pid {worker.pid}) did not get partitions: {err}"
                ) from None
        while every and len(self.assigned(names)) < partitions:
            if halted():
                raise WorkerGroupError("stopped while waiting for the partitions")
            if time.monotonic() >= deadline:
                raise WorkerGroupError(
                    f"{', '.join(names)} own partitions {sorted(self.assigned(names))} of "
                    f"{partitions} after {timeout:.0f}s; see the logs in {self.logs}"
                )
            if fail_on_exit:
                self.check_alive()
            time.sleep(POLL_S)

    def check_alive(self) -> None:
        """`WorkerGroupError` if a running worker exited by itself (it names its log)."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            if not worker.handle.alive():
                raise WorkerGroupError(
                    f"{worker.name} (pid {worker.pid}) exited by itself with status "
                    f"{worker.handle.returncode}; see {worker.handle.log_path}:\n"
                    f"{worker.handle.log_tail(15)}"
                )

    # ------------------------------------------------------------------ stop
    def kill(self, name: str) -> int:
        """SIGKILL the worker ``name`` at once, as a crash would; its pid."""
        worker = self._take(name)
        worker.handle.kill()
        return worker.pid

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop the worker ``name`` gracefully (SIGTERM, SIGKILL after ``timeout``); its exit
        status."""
        return self._take(name).handle.stop(timeout)

    def close(self, say: Callable[[str], None] = lambda _: None) -> None:
        """Stop every running worker: SIGTERM to all first (they shut down side by side),
        then SIGKILL to any still running after ``STOP_TIMEOUT_S``. No new worker starts."""
        with self._lock:
            self._closed = True
            workers = list(self.workers.values())
            self.workers.clear()
            self.stopped += workers
        for worker in workers:
            if worker.handle.alive():
                worker.handle.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                code = worker.handle.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = worker.handle.kill()
            say(f"stopped {worker.name} (pid {worker.pid}, exit status {code})")

    def _take(self, name: str) -> Worker:
        with self._lock:
            if name not in self.workers:
                running = ", ".join(sorted(self.workers)) or "none"
                raise WorkerGroupError(f"no running worker {name!r} (running: {running})")
            worker = self.workers.pop(name)
            self.stopped.append(worker)
            return worker


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C does: through every ``finally``, so that the children
    this process started (workers, a broker) are stopped. Main thread only."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
