"""Worker housekeeping without a broker: stale local files, state topic configs, options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stream_rnn.ops.settings import Settings
from stream_rnn.stream.topics import state_topic_config
from stream_rnn.stream.worker import WorkerOptions, remove_stale_dirs


def test_local_files_of_dead_workers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = tmp_path / f"g1-{int(dead.stdout)}"
    mine = tmp_path / f"g1-{os.getpid()}"
    parent = tmp_path / f"g2-{os.getppid()}"  # alive: kept
    other = tmp_path / "notes"  # not a worker directory: kept
    for d in (gone, mine, parent, other):
        (d / "states.db").parent.mkdir(parents=True)
        (d / "states.db").write_bytes(b"x")
    assert remove_stale_dirs(tmp_path) == 1
    assert not gone.exists() and mine.exists() and parent.exists() and other.exists()
    assert remove_stale_dirs(tmp_path / "missing") == 0


def test_state_topic_is_compacted_and_tolerates_one_replica_down() -> None:
    assert state_topic_config(Settings(replication=1)) == {"cleanup.policy": "compact"}
    assert state_topic_config(Settings(replication=3)) == {
        "cleanup.policy": "compact",
        "min.insync.replicas": "2",
    }


def test_worker_defaults_recover_fast_and_are_exactly_once() -> None:
    opts = WorkerOptions.from_settings("m", Settings())
    assert opts.guarantee == "exactly-once" and opts.commit_interval_s == 0.1
    assert opts.session_timeout_s == 10.0 and opts.heartbeat_interval_s == 3.0
    flags = WorkerOptions.from_settings("m", Settings(), guarantee="at-least-once")
    assert flags.guarantee == "at-least-once"
