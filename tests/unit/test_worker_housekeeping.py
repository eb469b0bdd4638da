"""Worker housekeeping without a broker: stale local files, state topic configs, options."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.settings import Settings
from stream_rnn.registry import save_checkpoint
from stream_rnn.stream.commit import EXIT_SOFTWARE
from stream_rnn.stream.topics import state_topic_config
from stream_rnn.stream.worker import StreamWorker
from stream_rnn.stream.worker_app import remove_stale_dirs
from stream_rnn.stream.worker_options import WorkerOptions
from stream_rnn.train.vocab import Vocab


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


def _worker(tmp_path: Path, guarantee: str) -> StreamWorker:
    vocab = Vocab.from_tokens(list("abcd"), "char")
    cfg = ModelConfig(
        task="next-token", cell="gru", vocab_size=len(vocab), embed_dim=4, hidden_size=8
    )
    save_checkpoint(tmp_path / "m", RecurrentModel(cfg).eval(), vocab=vocab.to_dict())
    opts = WorkerOptions(
        model_dir=tmp_path / "m",
        bootstrap="127.0.0.1:1",  # never contacted: no client is started
        worker_dir=tmp_path / "w",
        guarantee=guarantee,
    )
    return StreamWorker(opts)


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_an_unexpected_error_in_a_commit_ends_it_and_exits(tmp_path: Path, guarantee: str) -> None:
    worker = _worker(tmp_path, guarantee)
    exits: list[int] = []
    worker.exit = exits.append
    worker.protocol.assigned({0: 5})
    worker.protocol.processed(0, 9)

    def broken(*args: object) -> object:
        raise RuntimeError("disk on fire")

    worker.durable.take_changes = broken  # type: ignore[method-assign]
    worker.durable.snapshot = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk on fire"):
        asyncio.run(worker.commit_point(force=True))
    assert exits == [EXIT_SOFTWARE]
    assert worker.protocol.in_flight is None  # no later commit meets a stale plan
    worker.close()


def test_an_idle_worker_trims_its_heap_once_per_idle_period(tmp_path: Path) -> None:
    worker = _worker(tmp_path, "at-least-once")
    assert worker.trim_when_idle(idle_s=0.0) is False  # nothing processed yet: nothing to give
    worker.sensor.tokens = 100
    assert worker.trim_when_idle(idle_s=3600.0) is False  # a batch ended just now: not idle
    assert worker.trim_when_idle(idle_s=0.0) is True and worker.heap_trims == 1
    assert worker.trim_when_idle(idle_s=0.0) is False  # same idle period
    worker.sensor.tokens = 101
    assert worker.trim_when_idle(idle_s=0.0) is True and worker.heap_trims == 2
    status = worker.status()
    assert status["heap_trims"] == 2 and status["rss_bytes"] > 10 << 20
    worker.close()


class _Sender:
    """Records what is sent; each send's acks are a future the test resolves."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[bytes | None, bytes]]] = []
        self.futures: list[asyncio.Future[object]] = []

    async def send(
        self, topic: str, messages: list[tuple[bytes | None, bytes]]
    ) -> list[asyncio.Future[object]]:
        self.sent.append(list(messages))
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return [future]


def test_at_least_once_sends_without_waiting_for_acks_and_commits_only_acked_outputs(
    tmp_path: Path,
) -> None:
    from aiokafka.errors import KafkaTimeoutError

    from stream_rnn.stream.adapter import Outputs

    worker = _worker(tmp_path, "at-least-once")
    worker.durable.interval_s = 0.0  # no state checkpoints: offsets only
    sender = _Sender()
    worker.sender = sender  # type: ignore[assignment]
    one = Outputs(predictions=[(b"k", b"p1")], dead_letters=[])
    two = Outputs(predictions=[(b"k", b"p2")], dead_letters=[])
    committed: list[tuple[dict[int, int], list[bool]]] = []

    async def commit_offsets(offsets: dict[int, int]) -> bool:
        committed.append((offsets, [f.done() for f in sender.futures]))
        return True

    worker.commit_offsets = commit_offsets

    async def scenario() -> None:
        await asyncio.wait_for(worker.deliver(one), 1)  # returns before its acks
        assert sender.sent == [[(b"k", b"p1")], []] and worker._unacked is not None
        second = asyncio.ensure_future(worker.deliver(two))
        await asyncio.sleep(0.01)
        assert not second.done()  # waits for the first batch's acks before sending its own
        sender.futures[0].set_exception(KafkaTimeoutError())  # the broker failed them
        sender.futures[1].set_result(None)
        await asyncio.sleep(0.01)
        assert sender.sent[2] == [(b"k", b"p1")]  # sent again, before the second batch
        for f in sender.futures[2:]:
            f.set_result(None)
        await asyncio.wait_for(second, 1)
        assert [m for batch in sender.sent for m in batch] == [
            (b"k", b"p1"), (b"k", b"p1"), (b"k", b"p2")
        ]  # fmt: skip
        worker.protocol.assigned({0: 5})
        worker.protocol.processed(0, 9)
        commit = asyncio.ensure_future(worker.commit_point(force=True))
        await asyncio.sleep(0.01)
        assert not committed  # the second batch's acks are not in yet
        for f in sender.futures:
            if not f.done():
                f.set_result(None)
        await asyncio.wait_for(commit, 1)
        assert committed == [({0: 10}, [True] * len(sender.futures))]

    asyncio.run(scenario())
    worker.close()
