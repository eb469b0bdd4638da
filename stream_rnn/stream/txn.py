"""Kafka transactions of an exactly-once worker: one transactional producer per input partition.

Each tokens partition the worker owns gets an aiokafka producer with the transactional id
``<group>.<tokens topic>.<partition>`` (Kafka Streams' first exactly-once mode, "one producer
per task"): aiokafka's ``send_offsets_to_transaction`` takes a group id only, not the group
metadata that KIP-447's single-producer fencing needs. Whoever owns a partition next opens a
producer with the same id, which fences the previous owner (its writes fail with
``ProducerFenced``) and aborts its open transaction, so a paused or cut-off worker (a zombie)
can never commit anything for a partition it lost.

Per commit interval and partition, one transaction holds the predictions and dead letters of
the micro-batches since the last commit (sent as they are produced), the records of the
states they changed (and tombstones of deleted keys), and the consumed offsets.

A transaction that breaks for any reason but fencing (aiokafka's producer dies when a broker
closes a connection in the middle of a coordinator request, as it does when it shuts down) is
recovered, not given up: the outputs of the open transaction are kept until it commits, so a
new producer with the same transactional id (which aborts the broken transaction) can send them
again. Before it does, it reads the partition's committed offset back: if that moved past the
worker's own last commit, another worker committed in between — this one is a zombie and must
not commit anything — and `Fenced` is raised; if it equals the offset a failed commit was
committing, that commit had landed.

Example::

    txns = PartitionTransactions("127.0.0.1:9092", group="g1", tokens_topic="stream-rnn.tokens")
    await txns.open([0, 2])              # fences earlier owners of partitions 0 and 2
    await txns.send(0, "stream-rnn.predictions", [(b"user-1", b"{...}")])
    await txns.commit(0, "stream-rnn.tokens-state", states, deleted, next_offset=1042)
    await txns.close([0, 2])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation, KafkaError, ProducerFenced

from stream_rnn.engine.store import StoredState
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.sender import MAX_BATCH_BYTES, send_partitioned
from stream_rnn.stream.state import send_state_records

log = logging.getLogger("stream_rnn.worker")
TRANSACTION_TIMEOUT_MS = 60_000
# aiokafka retries a transactional request that the coordinator answers with
# CONCURRENT_TRANSACTIONS (the previous commit's markers are still being written: every commit
# hits it) after retry_backoff_ms, 100 ms by default. 20 ms took a commit round of 4 partitions
# from ~100 ms to ~33 ms on the local broker (/tmp experiment, 20 rounds).
RETRY_BACKOFF_MS = 20
RECOVERIES = 3  # new producers per send or commit before giving up (the worker then exits)
RESTART_BACKOFF_S = 1.0
# What breaks a transaction. A request of the transaction that fails (AddPartitionsToTxn while
# the broker restarts) leaves aiokafka's producer in its abortable-error state, where every
# later send and send_offsets_to_transaction raises IllegalOperation ("Can't send messages
# while not in transaction"), which is not a KafkaError: it is recovered the same way.
BROKEN = (KafkaError, IllegalOperation)


def _as_error(err: BaseException) -> BaseException:
    """What a caller sees when recoveries run out: a KafkaError as it is, IllegalOperation as
    a StreamError (callers handle both; neither is a bug of theirs)."""
    if isinstance(err, IllegalOperation):
        return StreamError(f"the transactional producer refused to continue: {err}")
    return err


class Fenced(StreamError):
    """Another worker opened this partition's transactional producer: we lost the partition."""


def transactional_id(group: str, tokens_topic: str, partition: int) -> str:
    """The transactional id of one input partition (stable across workers of the group)."""
    return f"{group}.{tokens_topic}.{partition}"


class _Partition:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.open = False  # a transaction is begun
        self.futures: list[asyncio.Future[Any]] = []
        # outputs sent in the open transaction, to send again if it breaks
        self.retained: list[tuple[str, list[tuple[bytes | None, bytes]]]] = []
        # set from prepare_commit() until the commit ends: new outputs wait for the next one
        self.committing: asyncio.Future[None] | None = None
        self.lock = asyncio.Lock()  # one recovery at a time


async def _no_offset(partition: int) -> int:
    raise StreamError("no way to read committed offsets was given")


class PartitionTransactions:
    """The transactional producers of one worker, one per owned input partition.

    ``floor(p)``: the offset the worker last committed for ``p`` (or found committed when it
    got ``p``); ``read_committed(p)``: the group's committed offset of ``p`` now. Both are used
    to tell a broken transaction (recovered) from a lost partition (`Fenced`).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        group: str,
        tokens_topic: str,
        client_id: str = "stream-rnn",
        floor: Callable[[int], int] = lambda p: 0,
        read_committed: Callable[[int], Awaitable[int]] = _no_offset,
    ) -> None:
        self.bootstrap, self.group, self.tokens_topic = bootstrap, group, tokens_topic
        self.client_id = client_id
        self.floor, self.read_committed = floor, read_committed
        self._parts: dict[int, _Partition] = {}
        self._partition_of: dict[tuple[str, int], dict[bytes, int]] = {}
        self.transactions = 0
        self.recoveries = 0

    @property
    def partitions(self) -> list[int]:
        return sorted(self._parts)

    def is_open(self, partition: int) -> bool:
        part = self._parts.get(partition)
        return part is not None and part.open

    async def open(self, partitions: Iterable[int]) -> None:
        """Start the producers of ``partitions`` (init_transactions: fences earlier owners)."""
        new = [p for p in partitions if p not in self._parts]
        producers = await asyncio.gather(*(self._producer(p) for p in new))
        for p, producer in zip(new, producers, strict=True):
            self._parts[p] = _Partition(producer)

    async def _producer(self, partition: int) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-p{partition}",
            transactional_id=transactional_id(self.group, self.tokens_topic, partition),
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            retry_backoff_ms=RETRY_BACKOFF_MS,
            enable_idempotence=True,
            acks="all",
            # outputs and states are appended as whole broker batches (send_batch): lingering
            # would only delay them, and the commit that waits for their acknowledgements
            linger_ms=0,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=8 << 20,
        )
        try:
            await producer.start()
        except KafkaError as err:
            await producer.stop()
            raise StreamError(
                f"cannot start the transactional producer of partition {partition} at "
                f"{self.bootstrap} ({err!r}); check the broker (transactions need "
                "transaction.state.log.* settings that fit the cluster size)"
            ) from err
        return producer

    async def send(
        self, partition: int, topic: str, messages: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        """Add ``messages`` to the partition's open transaction (begun if none is)."""
        if not messages:
            return
        batch = list(messages)
        for attempt in range(RECOVERIES + 1):
            part = await self._begin(partition)
            try:
                futures = await send_partitioned(part.producer, topic, batch, self._partition_of)
            except ProducerFenced as err:
                raise Fenced(f"partition {partition}: {err}") from err
            except BROKEN as err:
                if attempt == RECOVERIES:
                    raise _as_error(err) from err
                await self._recover(partition, err, accept={self.floor(partition)})
                continue
            part.retained.append((topic, batch))
            part.futures += futures
            return

    async def _begin(self, partition: int, *, committing: bool = False) -> _Partition:
        part = self._parts.get(partition)
        if part is None:
            raise StreamError(f"partition {partition} has no transactional producer (not owned)")
        while not committing and part.committing is not None:
            # outputs after a commit began belong to the next transaction
            await asyncio.shield(part.committing)
            part = self._parts[partition]
        if not part.open:
            await part.producer.begin_transaction()  # local: waits for the producer id only
            part.open = True
        return part

    def prepare_commit(self, partitions: Iterable[int]) -> None:
        """Close ``partitions``' open transactions to new outputs, at once (synchronously):
        what is sent from now on waits for `commit` and goes into the next transaction. The
        worker calls this together with taking the commit's states and offsets."""
        loop = asyncio.get_running_loop()
        for p in partitions:
            part = self._parts.get(p)
            if part is not None and part.committing is None:
                part.committing = loop.create_future()

    async def commit(
        self,
        partition: int,
        state_topic: str,
        states: Sequence[tuple[str, StoredState]],
        deleted: Sequence[tuple[str, int]],
        next_offset: int | None,
    ) -> int:
        """Add the state records and the consumed offset, then commit; returns bytes of states.

        A broken transaction is recovered and committed again (module docstring). Raises
        `Fenced` if another worker took the partition, `KafkaError` when recoveries ran out
        (the caller aborts and exits: the engine's states are ahead of what is committed).
        """
        try:
            for attempt in range(RECOVERIES + 1):
                part = await self._begin(partition, committing=True)
                try:
                    size = await self._commit_once(
                        part, partition, state_topic, states, deleted, next_offset
                    )
                except ProducerFenced as err:
                    raise Fenced(f"partition {partition}: {err}") from err
                except BROKEN as err:
                    if attempt == RECOVERIES:
                        raise _as_error(err) from err
                    accept = {self.floor(partition)}
                    if next_offset is not None:
                        accept.add(next_offset)
                    committed = await self._recover(partition, err, accept=accept, replay=False)
                    if next_offset is not None and committed == next_offset != self.floor(
                        partition
                    ):
                        log.info("partition %d: the commit had landed before the error", partition)
                        self._parts[partition].retained = []
                        return 0
                    await self._replay(self._parts[partition])
                    continue
                part.retained = []
                part.open = False
                self.transactions += 1
                return size
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            current = self._parts.get(partition)
            done = current.committing if current is not None else None
            if current is not None:
                current.committing = None
            if done is not None and not done.done():
                done.set_result(None)

    async def _commit_once(
        self,
        part: _Partition,
        partition: int,
        state_topic: str,
        states: Sequence[tuple[str, StoredState]],
        deleted: Sequence[tuple[str, int]],
        next_offset: int | None,
    ) -> int:
        try:
            futures, size = await send_state_records(
                part.producer, state_topic, partition, states, deleted
            )
            part.futures += futures
            # Every batch of the transaction must be acknowledged before the commit is asked
            # for: aiokafka fails a batch on its own (one that waited longer than the request
            # timeout for a partition leader, as in a broker restart) and still commits the
            # transaction, offsets included, without it. A failed batch breaks the transaction
            # here instead, and the recovery sends everything again.
            await asyncio.gather(*part.futures)
            if next_offset is not None:
                await part.producer.send_offsets_to_transaction(
                    {TopicPartition(self.tokens_topic, partition): next_offset}, self.group
                )
            await part.producer.commit_transaction()
        finally:
            futures_done, part.futures = part.futures, []
            for fut in futures_done:  # retrieved here, or asyncio reports them as lost
                if fut.done() and not fut.cancelled():
                    fut.exception()
        return size

    async def _recover(
        self, partition: int, error: BaseException, *, accept: set[int], replay: bool = True
    ) -> int:
        """Replace a broken transaction's producer (module docstring); the committed offset."""
        part = self._parts[partition]
        async with part.lock:
            self.recoveries += 1
            log.warning(
                "the transaction of partition %d broke (%r); starting a new producer",
                partition,
                error,
            )
            try:
                await asyncio.wait_for(part.producer.stop(), 10)
            except Exception as err:  # noqa: BLE001 - it is broken; the new one aborts its work
                log.info("stopping the broken producer of partition %d: %r", partition, err)
            while True:
                try:
                    producer = await self._producer(partition)
                    break
                except StreamError as err:  # the broker is away: wait (bounded by the caller)
                    log.warning("%s; retrying in %.0fs", err, RESTART_BACKOFF_S)
                    await asyncio.sleep(RESTART_BACKOFF_S)
            fresh = _Partition(producer)
            fresh.retained, fresh.committing = part.retained, part.committing
            for fut in part.futures:
                if fut.done() and not fut.cancelled():
                    fut.exception()
            self._parts[partition] = fresh
            committed = await self.read_committed(partition)
            if committed not in accept:
                raise Fenced(
                    f"partition {partition}: its committed offset is {committed}, not "
                    f"{sorted(accept)}: another worker committed it meanwhile"
                )
            if replay:
                await self._replay(fresh)
            return committed

    async def _replay(self, part: _Partition) -> None:
        if not part.retained:
            return
        if not part.open:
            await part.producer.begin_transaction()
            part.open = True
        for topic, batch in part.retained:
            part.futures += await send_partitioned(part.producer, topic, batch, self._partition_of)

    async def abort_all(self) -> None:
        """Abort every open transaction (best effort: the next owner's producer aborts them too)."""
        for partition, part in self._parts.items():
            if part.open:
                try:
                    await asyncio.wait_for(part.producer.abort_transaction(), 10)
                except Exception as err:  # noqa: BLE001 - best effort before an exit
                    log.warning("aborting the transaction of partition %d: %r", partition, err)
                part.open = False
                for fut in part.futures:
                    fut.cancel()
                part.futures = []

    async def close(self, partitions: Iterable[int] | None = None) -> None:
        """Stop the producers of ``partitions`` (all if None); open transactions are aborted."""
        for p in list(self._parts) if partitions is None else list(partitions):
            part = self._parts.pop(p, None)
            if part is None:
                continue
            try:
                if part.open:
                    await asyncio.wait_for(part.producer.abort_transaction(), 10)
            except Exception as err:  # noqa: BLE001 - the next owner aborts it anyway
                log.warning("aborting the transaction of partition %d on close: %r", p, err)
            try:
                await asyncio.wait_for(part.producer.stop(), 10)
            except Exception as err:  # noqa: BLE001 - closing; nothing is left to lose
                log.warning("stopping the producer of partition %d: %r", p, err)
