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
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from stream_rnn.engine.store import StoredState
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.sender import MAX_BATCH_BYTES, send_partitioned
from stream_rnn.stream.state import send_state_records

log = logging.getLogger("stream_rnn.worker")
TRANSACTION_TIMEOUT_MS = 60_000


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


class PartitionTransactions:
    """The transactional producers of one worker, one per owned input partition."""

    def __init__(
        self, bootstrap: str, *, group: str, tokens_topic: str, client_id: str = "stream-rnn"
    ) -> None:
        self.bootstrap, self.group, self.tokens_topic = bootstrap, group, tokens_topic
        self.client_id = client_id
        self._parts: dict[int, _Partition] = {}
        self._partition_of: dict[tuple[str, int], dict[bytes, int]] = {}
        self.transactions = 0

    @property
    def partitions(self) -> list[int]:
        return sorted(self._parts)

    def is_open(self, partition: int) -> bool:
        part = self._parts.get(partition)
        return part is not None and part.open

    async def open(self, partitions: Iterable[int]) -> None:
        """Start the producers of ``partitions`` (init_transactions: fences earlier owners)."""
        new = [p for p in partitions if p not in self._parts]
        await asyncio.gather(*(self._start(p) for p in new))

    async def _start(self, partition: int) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-p{partition}",
            transactional_id=transactional_id(self.group, self.tokens_topic, partition),
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
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
        self._parts[partition] = _Partition(producer)

    async def send(
        self, partition: int, topic: str, messages: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        """Add ``messages`` to the partition's open transaction (begun if none is)."""
        if not messages:
            return
        part = await self._begin(partition)
        part.futures += await send_partitioned(part.producer, topic, messages, self._partition_of)

    async def _begin(self, partition: int) -> _Partition:
        part = self._parts.get(partition)
        if part is None:
            raise StreamError(f"partition {partition} has no transactional producer (not owned)")
        if not part.open:
            await part.producer.begin_transaction()  # local: waits for the producer id only
            part.open = True
        return part

    async def commit(
        self,
        partition: int,
        state_topic: str,
        states: Sequence[tuple[str, StoredState]],
        deleted: Sequence[tuple[str, int]],
        next_offset: int | None,
    ) -> int:
        """Add the state records and the consumed offset, then commit; returns bytes of states.

        Raises `Fenced` if another worker took the partition, `KafkaError` on other failures
        (the caller aborts and exits: the engine's states are ahead of what is committed).
        """
        part = await self._begin(partition)
        try:
            futures, size = await send_state_records(
                part.producer, state_topic, partition, states, deleted
            )
            part.futures += futures
            if next_offset is not None:
                await part.producer.send_offsets_to_transaction(
                    {TopicPartition(self.tokens_topic, partition): next_offset}, self.group
                )
            await part.producer.commit_transaction()
            # every batch of the transaction is acknowledged once the commit returned
            await asyncio.gather(*part.futures)
        except ProducerFenced as err:
            raise Fenced(f"partition {partition}: {err}") from err
        finally:
            part.futures = []
        part.open = False
        self.transactions += 1
        return size

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
                await part.producer.stop()
            except Exception as err:  # noqa: BLE001 - closing; nothing is left to lose
                log.warning("stopping the producer of partition %d: %r", p, err)
