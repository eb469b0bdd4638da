"""A commit under way never holds up the next micro-batch (the worker's agent loop, no broker).

The real `StreamWorker` (exactly-once: a transaction per partition) runs in `consume_batches`
as the faust agent runs it; its partition transactions are replaced by a stand-in whose commit
blocks until the test releases it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stream_harness import make_model

from stream_rnn.stream.batches import consume_batches
from stream_rnn.stream.worker import StreamWorker
from stream_rnn.stream.worker_options import WorkerOptions


class BlockingTransactions:
    """PartitionTransactions for partition 0 whose commit waits for ``release``."""

    partitions = [0]

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.committing = asyncio.Event()
        self.sent = 0
        self.commits: list[int | None] = []

    def is_open(self, partition: int) -> bool:
        return self.sent > 0

    def prepare_commit(self, partitions: Iterable[int]) -> None:
        return None

    async def send(self, partition: int, topic: str, records: list[Any]) -> None:
        self.sent += len(records)

    async def commit(
        self, partition: int, topic: str, states: list[Any], deleted: list[Any], offset: int | None
    ) -> int:
        self.committing.set()
        await self.release.wait()
        self.commits.append(offset)
        return 0

    async def close(self, partitions: Iterable[int] | None = None) -> None:
        return None

    async def abort_all(self) -> None:
        return None


def _event(offset: int) -> SimpleNamespace:
    message = SimpleNamespace(
        topic="tokens", partition=0, offset=offset, key=b"user-1", timestamp=0.0,
        value=b'{"v": 1, "type": "token", "token": "a"}', generation_id=1,
    )  # fmt: skip
    return SimpleNamespace(message=message)


def test_a_transaction_commit_under_way_does_not_hold_up_the_next_batch(tmp_path: Path) -> None:
    model_dir, _, _ = make_model(tmp_path, "next-token", 4)
    opts = WorkerOptions(
        model_dir=model_dir,
        bootstrap="127.0.0.1:1",
        worker_dir=tmp_path / "workers",
        guarantee="exactly-once",
        commit_interval_s=0.001,
    )
    worker = StreamWorker(opts)
    txns = BlockingTransactions()
    worker.txns = txns  # type: ignore[assignment]

    async def main() -> tuple[int, int, list[int | None]]:
        worker.protocol.assigned({0: 0})
        worker.durable.restored.add(0)  # nothing to restore: no state topic here
        worker.generation = lambda: 1
        worker.settled.set()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.create_task(
            consume_batches(
                queue, 8, 0.0, worker.handle, worker.commit_point, stopping=lambda: worker.stopping
            )  # fmt: skip
        )
        for offset in range(3):
            queue.put_nowait(_event(offset))
        await asyncio.wait_for(txns.committing.wait(), 10)  # batch 1 handled, its commit blocks
        before = worker.sensor.events
        for offset in range(3, 6):
            queue.put_nowait(_event(offset))
        for _ in range(200):  # batch 2 goes through while the commit still waits
            if worker.sensor.events > before:
                break
            await asyncio.sleep(0.01)
        during = worker.sensor.events
        assert not txns.commits, "the commit finished early: the test proves nothing"
        txns.release.set()
        await worker.commit_point(force=True)  # what the idle timer or the next batch does
        worker.stopping = True
        queue.put_nowait(_event(6))
        await asyncio.wait_for(loop, 10)
        return before, during, txns.commits

    try:
        before, during, commits = asyncio.run(main())
    finally:
        worker.close()
    assert before == 3 and during == 6
    # the first commit held batch 1's offsets, the next one batch 2's
    assert commits == [3, 6]
