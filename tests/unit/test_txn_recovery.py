"""PartitionTransactions without a broker: broken transactions are recovered, zombies fenced.

A fake aiokafka producer records what each transaction held; a commit that breaks (as
aiokafka's producer does when the broker closes a connection mid-request) must be redone by a
new producer with every output of the transaction sent again — unless the committed offset
shows that the commit had landed, or that another worker committed meanwhile (then `Fenced`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from aiokafka.errors import IllegalOperation, KafkaError, NotLeaderForPartitionError, ProducerFenced

from stream_rnn.engine.store import StoredState
from stream_rnn.stream.txn import Fenced, PartitionTransactions


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def append(
        self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any = None
    ) -> object:
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class FakeProducer:
    """Commits what was sent since begin_transaction into ``log`` (committed transactions)."""

    def __init__(
        self,
        log: list[dict[str, Any]],
        fail_commits: int = 0,
        fence: bool = False,
        fail_batches: int = 0,
        abortable_after: int | None = None,
    ) -> None:
        self.log, self.fail_commits, self.fence = log, fail_commits, fence
        # after this many batches a request of the transaction failed: aiokafka's producer is
        # in its abortable-error state and refuses every later send (as in a broker restart)
        self.abortable_after = abortable_after
        # batches that fail on their own (aiokafka fails a batch that waited longer than the
        # request timeout for a partition leader) while the transaction could still commit
        self.fail_batches = fail_batches
        self.pending: dict[str, Any] = {}
        self.stopped = False

    async def begin_transaction(self) -> None:
        self.pending = {"records": [], "offsets": None}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future[Any]:
        if self.abortable_after is not None:
            if self.abortable_after == 0:
                raise IllegalOperation("Can't send messages while not in transaction")
            self.abortable_after -= 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_batches:
            self.fail_batches -= 1
            fut.set_exception(NotLeaderForPartitionError())
            return fut
        self.pending["records"] += [(topic, partition, k, v) for k, v in batch.records]
        fut.set_result(None)
        return fut

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group: str) -> None:
        self.pending["offsets"] = {tp.partition: off for tp, off in offsets.items()}

    async def commit_transaction(self) -> None:
        if self.fence:
            raise ProducerFenced()
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaError("Unexpected error during batch delivery")
        self.log.append(self.pending)

    async def abort_transaction(self) -> None:
        self.pending = {}

    async def stop(self) -> None:
        self.stopped = True


def _state() -> StoredState:
    return StoredState(h=torch.zeros(1, 4), c=None, seq=0, pos=3, offset=41, partition=0)


def _txns(
    producers: list[FakeProducer], committed: list[int], floor: int = 10
) -> PartitionTransactions:
    async def read_committed(partition: int) -> int:
        return committed[0]

    txns = PartitionTransactions(
        "fake:9092",
        group="g",
        tokens_topic="t",
        floor=lambda p: floor,
        read_committed=read_committed,
    )

    async def next_producer(partition: int) -> Any:
        return producers.pop(0)

    txns._producer = next_producer  # type: ignore[method-assign]
    return txns


def _run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_a_broken_commit_is_redone_whole_by_a_new_producer() -> None:
    log: list[dict[str, Any]] = []
    first, second = FakeProducer(log, fail_commits=1), FakeProducer(log)
    txns = _txns([first, second], committed=[10])

    async def scenario() -> int:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1"), (b"k", b"p2")])
        await txns.send(0, "dead", [(b"k", b"d1")])
        txns.prepare_commit([0])
        return await txns.commit(0, "state", [("k", _state())], [("gone", 40)], next_offset=42)

    _run(scenario)
    assert first.stopped and txns.recoveries == 1
    [txn] = log  # exactly one committed transaction, by the second producer
    values = [v for topic, _, _, v in txn["records"] if topic in ("preds", "dead")]
    assert values == [b"p1", b"p2", b"d1"]  # every output of the broken one, once, in order
    states = [(k, v is None) for topic, _, k, v in txn["records"] if topic == "state"]
    assert states == [(b"k", False), (b"gone", True)]
    assert txn["offsets"] == {0: 42}


def test_a_commit_that_had_landed_is_not_redone() -> None:
    log: list[dict[str, Any]] = []
    first, second = FakeProducer(log, fail_commits=1), FakeProducer(log)
    txns = _txns([first, second], committed=[42])  # the broker has our offset: it landed

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=42)
        await txns.send(0, "preds", [(b"k", b"p2")])  # the next transaction starts clean
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=43)

    _run(scenario)
    assert [[v for *_, v in t["records"]] for t in log] == [[b"p2"]]


def test_a_moved_committed_offset_means_a_zombie_it_is_fenced() -> None:
    log: list[dict[str, Any]] = []
    txns = _txns([FakeProducer(log, fail_commits=1), FakeProducer(log)], committed=[77])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=42)

    with pytest.raises(Fenced, match="committed offset is 77"):
        _run(scenario)
    assert log == []


def test_producer_fenced_is_fenced_and_never_recovered() -> None:
    log: list[dict[str, Any]] = []
    txns = _txns([FakeProducer(log, fence=True)], committed=[10])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=11)

    with pytest.raises(Fenced):
        _run(scenario)
    assert txns.recoveries == 0 and log == []


def test_outputs_sent_during_a_commit_wait_for_the_next_transaction() -> None:
    log: list[dict[str, Any]] = []
    txns = _txns([FakeProducer(log)], committed=[10])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"a")])
        txns.prepare_commit([0])
        later = asyncio.create_task(txns.send(0, "preds", [(b"k", b"b")]))
        await asyncio.sleep(0)
        assert not later.done()  # held back while the commit is under way
        await txns.commit(0, "state", [], [], next_offset=11)
        await later
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=12)

    _run(scenario)
    assert [[v for *_, v in t["records"]] for t in log] == [[b"a"], [b"b"]]


def test_a_failed_batch_is_never_committed_without_its_records() -> None:
    # aiokafka commits a transaction even when one of its batches failed: the commit must not
    # be asked for then, or the offsets commit without the outputs (seen in a broker restart)
    log: list[dict[str, Any]] = []
    first, second = FakeProducer(log, fail_batches=1), FakeProducer(log)
    txns = _txns([first, second], committed=[10])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])  # this batch fails after it was taken
        await txns.send(0, "preds", [(b"k", b"p2")])
        txns.prepare_commit([0])
        await txns.commit(0, "state", [], [], next_offset=42)

    _run(scenario)
    assert first.stopped and txns.recoveries == 1
    [txn] = log  # the broken transaction never committed; the new producer sent it all again
    assert [v for *_, v in txn["records"]] == [b"p1", b"p2"]
    assert txn["offsets"] == {0: 42}


@pytest.mark.parametrize("where", ["send", "commit"])
def test_a_transaction_in_aiokafkas_abortable_error_state_is_recovered(where: str) -> None:
    # a broker restart fails AddPartitionsToTxn: aiokafka's producer then raises
    # IllegalOperation (not a KafkaError) on every send; the worker exited 70 on it once
    log: list[dict[str, Any]] = []
    first = FakeProducer(log, abortable_after=1 if where == "send" else 2)
    second = FakeProducer(log)
    txns = _txns([first, second], committed=[10])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])
        await txns.send(0, "preds", [(b"k", b"p2")])  # "send": refused here
        txns.prepare_commit([0])
        # "commit": the state records are refused
        await txns.commit(0, "state", [("k", _state())], [], next_offset=42)

    _run(scenario)
    assert first.stopped and txns.recoveries == 1
    [txn] = log
    assert [v for topic, *_, v in txn["records"] if topic == "preds"] == [b"p1", b"p2"]
    assert txn["offsets"] == {0: 42}


def test_a_producer_that_keeps_refusing_ends_in_a_stream_error() -> None:
    from stream_rnn.stream.exceptions import StreamError
    from stream_rnn.stream.txn import RECOVERIES

    log: list[dict[str, Any]] = []
    producers = [FakeProducer(log, abortable_after=0) for _ in range(RECOVERIES + 1)]
    txns = _txns(producers, committed=[10])

    async def scenario() -> None:
        await txns.open([0])
        await txns.send(0, "preds", [(b"k", b"p1")])

    with pytest.raises(StreamError, match="refused to continue"):
        _run(scenario)
    assert log == [] and txns.recoveries == RECOVERIES
