"""Child processes, pids and loopback ports: what the broker, the demo, tests and benchmarks share.

`ManagedProcess` runs a program with its output in a log file and stops it (SIGTERM, then
SIGKILL); `WorkerHandle` is one ``python -m stream_rnn worker`` with a status port, polled until
a condition on its status holds. The functions below them work on bare pids (processes this
one did not start, or does not hold a ``Popen`` of), loopback ports and lock files.

Example::

    worker = WorkerHandle(["--model", "runs/lang", "--bootstrap", bootstrap], port, log_path)
    try:
        worker.wait_until(lambda s: bool(s["assigned"]), "partitions assigned", timeout=90)
        ...
    finally:
        worker.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess  # noqa: S404 - argument lists only, never a shell
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_rnn.ops.exceptions import KafkaStartError, OpsError

__all__ = [
    "KILL_TIMEOUT_S",
    "LOOPBACK",
    "POLL_S",
    "STOP_TIMEOUT_S",
    "WORKER_COMMAND",
    "ManagedProcess",
    "ProcessExitedError",
    "ProcessWaitTimeout",
    "WorkerHandle",
    "file_lock",
    "file_tail",
    "find_free_port",
    "pid_alive",
    "port_free",
    "port_open",
    "text_tail",
    "wait_exit",
    "worker_status",
]

LOOPBACK = "127.0.0.1"
WORKER_COMMAND = (sys.executable, "-m", "stream_rnn", "worker")
"""The argv prefix of a stream worker run by this interpreter."""
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0
POLL_S = 0.2


# Raised by the waits of ManagedProcess; here rather than in ops/exceptions.py because nothing
# else raises them, and a caller handles them right where it waits.
class ProcessExitedError(OpsError):
    """A process exited while something waited for it; ``returncode`` is its exit status."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ProcessWaitTimeout(OpsError):
    """A condition on a running process did not hold within the time allowed."""


# --------------------------------------------------------------------------- child processes


class ManagedProcess:
    """A child process (started at once) whose stdout and stderr go to ``log_path``.

    ``env`` adds to (and overrides) this process's environment; a ``None`` value removes the
    variable. ``name`` starts the messages of `wait_for` ("worker exited (1) before ...").

    Example::

        agent = ManagedProcess([sys.executable, "agent.py"], tmp / "agent.log", name="agent")
        agent.wait_for(done_file.exists, "its done file", timeout=300)
        assert agent.stop() == 0, agent.log_tail()
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
        name: str = "process",
    ) -> None:
        self.log_path = log_path
        self.name = name
        merged = {**os.environ, **(env or {})}
        full_env = {key: value for key, value in merged.items() if value is not None}
        with open(log_path, "wb") as log:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603 - argument list
                list(argv), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (and been polled), else ``None``."""
        return self.proc.returncode

    def alive(self) -> bool:
        """Whether the process still runs (reaps it if it exited)."""
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        return file_tail(self.log_path, lines)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads), from /proc; NaN
        where there is no /proc or the process is gone."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_for(
        self, condition: Callable[[], bool], what: str, timeout: float, *, poll_s: float = POLL_S
    ) -> None:
        """Poll ``condition`` until it holds.

        Raises:
            ProcessExitedError: the process exited first (the message has the log's tail).
            ProcessWaitTimeout: ``condition`` did not hold within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.alive():
                raise ProcessExitedError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.log_tail()}",
                    self.proc.returncode,
                )
            if time.monotonic() >= deadline:
                raise ProcessWaitTimeout(
                    f"{self.name} did not reach '{what}' within {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(poll_s)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; its exit status (``subprocess.TimeoutExpired`` if it
        is still running after ``timeout``)."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S, *, kill_timeout: float = KILL_TIMEOUT_S) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(kill_timeout)
        return self.proc.returncode

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> int:
        """SIGKILL at once, as a crash would; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout)


class WorkerHandle(ManagedProcess):
    """One ``python -m stream_rnn worker ARGS --web-port PORT`` process (see `ManagedProcess`).

    Example::

        worker = WorkerHandle(["--model", str(model_dir), "--bootstrap", bootstrap], port, log)
        status = worker.wait_until(lambda s: len(s["assigned"]) == 4, "all partitions", 90)
    """

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        log_path: Path,
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        argv = [*WORKER_COMMAND, *args, "--web-port", str(port)]
        super().__init__(argv, log_path, env=env, cwd=cwd, name="worker")
        self.port = port

    def status(self) -> dict[str, Any] | None:
        """What the worker's status endpoint reports now; ``None`` while it does not answer."""
        return worker_status(self.port)

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float,
        *,
        poll_s: float = POLL_S,
    ) -> dict[str, Any]:
        """Poll the status until ``predicate`` holds for it; that status.

        Raises:
            ProcessExitedError: the worker exited first (the message has the log's tail).
            ProcessWaitTimeout: ``predicate`` did not hold within ``timeout`` seconds.
        """
        seen: list[dict[str, Any]] = []

        def holds() -> bool:
            status = self.status()
            if status is not None and predicate(status):
                seen.append(status)
                return True
            return False

        self.wait_for(holds, what, timeout, poll_s=poll_s)
        return seen[-1]


def worker_status(port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """``GET http://127.0.0.1:PORT/`` of a worker (JSON); ``None`` if nothing answers."""
    url = f"http://{LOOPBACK}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            loaded: dict[str, Any] = json.loads(resp.read())
            return loaded
    except OSError:
        return None


# --------------------------------------------------------------------------- bare pids


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; a process of another user does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(pid, 0); /proc tells the truth on Linux
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def wait_exit(pid: int, timeout: float, *, alive: Callable[[int], bool] = pid_alive) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- loopback ports


def find_free_port(exclude: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks; ``exclude`` is skipped)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise KafkaStartError("the OS kept handing out excluded ports; free some loopback ports.")


def port_free(port: int) -> bool:
    """Whether a server could bind 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Java binds with SO_REUSEADDR, so sockets in TIME_WAIT do not block it; mirror that.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_open(port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- files


def text_tail(text: str, lines: int = 20) -> str:
    """The last ``lines`` lines of ``text`` (stripped), for error messages."""
    return "\n".join(text.strip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the file at ``path``, or a note that it does not exist."""
    try:
        return text_tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"({path} does not exist)"


@contextlib.contextmanager
def file_lock(path: Path, deadline: float, error: type[OpsError]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) until the block ends.

    Raises ``error`` if another process still holds it at ``deadline`` (``time.monotonic()``).
    """
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise error(
                        f"{path} stayed locked by another stream-rnn process; wait for it to "
                        f"finish (or stop it) and retry."
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
