"""The model-update listener of a worker: follow the announcements, verify off the hot path.

A worker started with ``--registry`` serves the production version and follows the compacted
``stream-rnn.model-updates`` topic (`stream_rnn.registry.updates`). `ModelFollower` reads it
with a group-less aiokafka consumer (every worker sees every announcement), read_committed,
from the beginning: the newest announcement already there is the version a worker starting
later picks up, and each one after it is a new version to swap in.

An announcement is checked in a thread, never on the event loop or the engine's executor
(signature with the shared key, checksums, tensor names and shapes, finite values, task and
label compatibility: `verify_update`); what passes is handed to the worker's ``apply``, which
swaps it in between two micro-batches. What fails is refused with its reason, logged and
counted, and the current model keeps serving. An announcement of the version being served is
ignored (a compacted topic repeats the newest one to every new reader).

Example::

    follower = ModelFollower(bootstrap, "stream-rnn.model-updates", key=None,
                             current=lambda: engine.manifest, apply=worker.swap_model,
                             rejected=worker.update_rejected)
    task = asyncio.create_task(follower.run())
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from kafka import KafkaConsumer
from kafka.errors import KafkaError as SyncKafkaError

from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.registry.exceptions import UpdateRejected
from stream_rnn.registry.updates import (
    UPDATE_KEY,
    ModelUpdate,
    VerifiedUpdate,
    read_current_update,
    verify_signature,
    verify_update,
)
from stream_rnn.registry.versions import Registry
from stream_rnn.stream.exceptions import StreamError

log = logging.getLogger("stream_rnn.worker")
RETRY_S = 2.0  # after a broker error, before reading on


def initial_model(
    registry: Path, bootstrap: str, topic: str, *, key: bytes | None
) -> tuple[Path, str]:
    """Where the version to serve first is, and where that was decided.

    The newest announcement on ``topic`` if there is one and it names a version that exists
    (its full verification comes with loading it); otherwise the registry's production pointer.
    An announcement that is refused already here (malformed, unsigned or wrongly signed with a
    key configured) is logged and the registry's pointer is served instead.
    """
    reg = Registry(registry)
    try:
        update = read_current_update(bootstrap, topic)
    except UpdateRejected as err:
        log.warning("the current model announcement is refused (%s); serving the registry's", err)
        update = None
    if update is not None and key is not None:
        try:
            verify_signature(update, key)
        except UpdateRejected as err:
            log.warning("the current model announcement is refused (%s)", err)
            update = None
    if update is not None and Path(update.location).is_dir():
        return Path(update.location), f"announced on {topic}"
    production = reg.production()
    if production is None:
        raise StreamError(
            f"the registry {registry} has no production version and {topic!r} announces none: "
            "publish one with `stream-rnn models publish MODEL_DIR --registry "
            f"{registry}` (or serve a fixed model with --model)"
        )
    return reg.path(production), f"production in {registry}"


def _partitions_of(bootstrap: str, topic: str) -> set[int] | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="stream-rnn-follower")
    try:
        return consumer.partitions_for_topic(topic)
    finally:
        consumer.close()


class ModelFollower:
    """Follows ``topic``; verified updates go to ``apply``, refused ones to ``rejected``."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        key: bytes | None,
        current: Callable[[], Manifest],
        apply: Callable[[VerifiedUpdate], Awaitable[None]],
        rejected: Callable[[UpdateRejected], None],
        client_id: str = "stream-rnn-follower",
        device: str = "cpu",
    ) -> None:
        self.bootstrap, self.topic, self.key = bootstrap, topic, key
        self.current, self.apply, self.rejected = current, apply, rejected
        self.client_id, self.device = client_id, device
        self.seen = 0  # announcements read

    async def run(self) -> None:
        """Read announcements until cancelled (broker errors: retried, never fatal)."""
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                client_id=self.client_id,
            )
            try:
                await consumer.start()
                await self._follow(consumer)
            except (KafkaError, SyncKafkaError) as err:
                log.warning("reading %s failed (%r); retrying in %.0fs", self.topic, err, RETRY_S)
            except Exception:  # a bug here must not stop serving: log it and read on
                log.exception("following %s failed; retrying in %.0fs", self.topic, RETRY_S)
            finally:
                await consumer.stop()
            await asyncio.sleep(RETRY_S)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            # aiokafka's metadata holds the partitions of subscribed topics only
            partitions = await asyncio.to_thread(_partitions_of, self.bootstrap, self.topic)
            if partitions:
                break
            await asyncio.sleep(RETRY_S)  # not created yet: the first publish creates it
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        log.info("following model updates on %s", self.topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        # What is on the topic already: only the newest announcement counts.
        newest: bytes | None = None
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    if rec.key == UPDATE_KEY and rec.value is not None:
                        newest = rec.value
        if newest is not None:
            await self._consider(newest)
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=1000)
            for records in batches.values():
                for rec in records:
                    if rec.key == UPDATE_KEY and rec.value is not None:
                        await self._consider(rec.value)

    async def _consider(self, raw: bytes) -> None:
        self.seen += 1
        try:
            update = ModelUpdate.from_bytes(raw)
            current = self.current()
            if update.version == current.version:
                return
            log.info("model update %s announced (policy %s); verifying", update.version,
                     update.policy)  # fmt: skip
            verified = await asyncio.to_thread(
                verify_update, update, key=self.key, current=current, device=self.device
            )
        except UpdateRejected as err:
            log.warning("model update refused (%s): %s", err.reason, err)
            self.rejected(err)
            return
        await self.apply(verified)
