"""The shared process helpers: start, wait, stop and pid checks, with short Python children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_rnn.ops.processes import (
    ManagedProcess,
    ProcessExitedError,
    ProcessWaitTimeout,
    file_tail,
    find_free_port,
    pid_alive,
    wait_exit,
    worker_status,
)


def _python(
    code: str, log: Path, *, env: dict[str, str | None] | None = None, name: str = "process"
) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-c", code], log, env=env, name=name)


def test_output_goes_to_the_log_and_env_adds_and_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROC_TEST_GONE", "x")
    code = "import os; print(os.environ.get('PROC_TEST_NEW'), os.environ.get('PROC_TEST_GONE'))"
    proc = _python(code, tmp_path / "p.log", env={"PROC_TEST_NEW": "1", "PROC_TEST_GONE": None})
    assert proc.wait(30) == 0
    assert proc.returncode == 0 and not proc.alive()
    assert proc.log_tail() == "1 None"


def test_stop_is_sigterm_then_sigkill(tmp_path: Path) -> None:
    graceful = _python("import time; time.sleep(60)", tmp_path / "a.log")
    assert graceful.alive()
    assert graceful.stop(timeout=10) == -signal.SIGTERM
    stubborn = _python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', "
        "flush=True); time.sleep(60)",
        tmp_path / "b.log",
    )
    stubborn.wait_for(lambda: "ready" in file_tail(stubborn.log_path), "ready", timeout=30)
    assert stubborn.stop(timeout=0.5) == -signal.SIGKILL
    assert stubborn.stop() == -signal.SIGKILL  # already gone: just the exit status


def test_waits_fail_with_the_log_when_the_process_exits_or_time_runs_out(tmp_path: Path) -> None:
    dying = _python("print('boom'); raise SystemExit(3)", tmp_path / "d.log", name="agent")
    with pytest.raises(
        ProcessExitedError, match=r"agent exited \(3\) before the end:\nboom"
    ) as err:
        dying.wait_for(lambda: False, "the end", timeout=30, poll_s=0.01)
    assert err.value.returncode == 3
    sleeper = _python("print('zzz', flush=True); import time; time.sleep(60)", tmp_path / "s.log")
    try:
        started = time.monotonic()
        with pytest.raises(ProcessWaitTimeout, match=r"did not reach 'never' within 0s"):
            sleeper.wait_for(lambda: False, "never", timeout=0.2, poll_s=0.01)
        assert time.monotonic() - started < 5
    finally:
        assert sleeper.kill() == -signal.SIGKILL


def test_pid_checks_see_zombies_as_dead(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        # exited but not reaped: a zombie still answers kill(pid, 0)
        while pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(child.pid)
    finally:
        child.wait(10)
    assert pid_alive(os.getpid())
    assert wait_exit(child.pid, timeout=1)
    assert not wait_exit(os.getpid(), timeout=0.1)


def test_status_of_a_port_nobody_serves_is_none() -> None:
    assert worker_status(find_free_port(), timeout=1) is None
