"""The model-update listener of a worker: follow the announcements, verify off the hot path.

A worker started with ``--registry`` serves the freshest announced version and follows the
compacted ``stream-rnn.model-updates`` topic (`stream_rnn.registry.updates`). `ModelFollower`
reads it with a group-less aiokafka consumer (every worker sees every announcement),
read_committed, from the beginning; each announcement after the newest one already there is a
new version to swap in.

An announcement is checked before anything is loaded: signed with the worker's key and
algorithm (unsigned only with ``--allow-unsigned-updates``), for this worker's registry and
topic, with a sequence number above every one seen (else ``stale``: a replay). Then, in a
thread, never on the event loop or the engine's executor, the named version is resolved in the
worker's own registry and verified (`verify_update`); what passes is handed to the worker's
``apply``, which swaps it in between two micro-batches. What fails is refused with its reason,
logged and counted, and the current model keeps serving. A re-announcement of the version
being served is ignored.

At start-up (`startup_model`) the same checks pick the version to serve: the freshest valid
announcement among the topic's records and the registry's own copy, verified exactly as a
running worker would; if it is refused, the newest registry version that verifies (production,
then earlier production versions, then the rest, newest first) serves, and the refusal is
reported. Only when nothing verifies does the worker stop (`StreamError`).

Example::

    choice = startup_model(registry_dir, bootstrap, topic, key=key)
    follower = ModelFollower(bootstrap, topic, key=key, registry=registry_dir,
                             after_seq=choice.seq, current=lambda: engine.manifest,
                             apply=worker.swap_model, rejected=worker.update_rejected)
    task = asyncio.create_task(follower.run())
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from kafka import KafkaConsumer
from kafka.errors import KafkaError as SyncKafkaError

from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.announce import ModelUpdate, check_authentic
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.registry.exceptions import RegistryError, UpdateRejected
from stream_rnn.registry.keys import UpdateKey
from stream_rnn.registry.updates import UPDATE_KEY, read_updates
from stream_rnn.registry.verify import VerifiedUpdate, load_version, verify_update
from stream_rnn.registry.versions import Registry
from stream_rnn.stream.exceptions import StreamError

log = logging.getLogger("stream_rnn.worker")
RETRY_S = 2.0  # after a broker error, before reading on


@dataclass(frozen=True)
class StartupChoice:
    """The version a worker serves first, and how that was decided.

    ``seq`` is the highest valid sequence number seen (the follower refuses anything at or
    below it); ``refusal`` says why the announced (or production) version is not served, and
    ``fallback`` is True when an older version serves because of it.
    """

    model_dir: Path
    version: str
    source: str
    seq: int = 0
    refusal: UpdateRejected | None = None
    fallback: bool = False
    # what was verified, to be served as it is (not loaded again from the files), and the
    # state policy the announcement of the served version asked for (None: not announced)
    loaded: tuple[RecurrentModel, Manifest] | None = None
    policy: str | None = None


def startup_model(
    registry: Path,
    bootstrap: str,
    topic: str,
    *,
    key: UpdateKey | bytes | None,
    allow_unsigned: bool = False,
    device: str = "cpu",
) -> StartupChoice:
    """Pick and verify the version to serve first (see the module docstring)."""
    reg = Registry(registry)
    try:
        registry_id = reg.identity()
    except (RegistryError, OSError) as exc:
        raise StreamError(f"cannot read the identity of the registry {registry}: {exc}") from exc
    best: ModelUpdate | None = None
    refusal: UpdateRejected | None = None
    for raw in [*read_updates(bootstrap, topic), reg.last_announcement()]:
        if raw is None:
            continue
        try:
            update = ModelUpdate.from_bytes(raw)
            check_authentic(
                update, key=key, registry_id=registry_id, topic=topic, allow_unsigned=allow_unsigned
            )
        except UpdateRejected as err:
            refusal = err  # the last one read is reported if none is valid
            continue
        if best is None or update.seq > best.seq:
            best = update
    seq = best.seq if best is not None else 0
    refused_version = None
    if best is not None:
        refusal = None
        try:
            verified = verify_update(
                best, registry=reg, current=None, topic=topic, allow_unsigned=allow_unsigned,
                key=key, after_seq=best.seq - 1, device=device,
            )  # fmt: skip
            where = f"announced on {topic}, sequence number {best.seq}"
            loaded = (verified.model, verified.manifest)
            return StartupChoice(
                reg.path(best.version), best.version, where, seq, loaded=loaded, policy=best.policy
            )
        except UpdateRejected as err:
            refusal, refused_version = err, best.version
    if refusal is not None:
        log.warning("at start-up the announced model is refused: %s", refusal)
    return _newest_that_verifies(reg, seq, refusal, refused_version, device)


def _newest_that_verifies(
    reg: Registry,
    seq: int,
    refusal: UpdateRejected | None,
    refused_version: str | None,
    device: str,
) -> StartupChoice:
    production = reg.production()
    order = [production] if production is not None else []
    order += reversed(reg.history())
    order += [info.version for info in reversed(reg.list())]
    seen = {refused_version}
    for version in order:
        if version in seen:
            continue
        seen.add(version)
        try:
            loaded = load_version(reg, version, device=device)
        except UpdateRejected as err:
            log.warning("registry version %s does not verify: %s", version, err)
            refusal = refusal or err
            continue
        fallback = refusal is not None
        if fallback:
            log.warning(
                "serving %s, the newest version of %s that verifies, instead (%s)",
                version, reg.root, refusal.reason if refusal else "",
            )  # fmt: skip
        source = "newest version that verifies" if fallback else "production"
        return StartupChoice(
            reg.path(version), version, f"{source} in {reg.root}", seq, refusal, fallback, loaded
        )
    if production is None and refusal is None:
        raise StreamError(
            f"the registry {reg.root} has no production version and nothing is announced: "
            f"publish one with `stream-rnn models publish MODEL_DIR --registry {reg.root}` "
            "(or serve a fixed model with --model)"
        )
    raise StreamError(
        f"no version of the registry {reg.root} verifies ({refusal}); publish a good one with "
        f"`stream-rnn models publish MODEL_DIR --registry {reg.root}`"
    )


def _partitions_of(bootstrap: str, topic: str) -> set[int] | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="stream-rnn-follower")
    try:
        return consumer.partitions_for_topic(topic)
    finally:
        consumer.close()


class ModelFollower:
    """Follows ``topic``; verified updates go to ``apply``, refused ones to ``rejected``.

    ``registry`` is where announced versions are resolved (and whose identity they must be
    signed for); ``after_seq`` the highest sequence number seen before (at start-up).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        key: UpdateKey | bytes | None,
        registry: Registry | Path,
        current: Callable[[], Manifest],
        apply: Callable[[VerifiedUpdate], Awaitable[None]],
        rejected: Callable[[UpdateRejected], None],
        allow_unsigned: bool = False,
        after_seq: int = 0,
        client_id: str = "stream-rnn-follower",
        device: str = "cpu",
    ) -> None:
        self.bootstrap, self.topic, self.key = bootstrap, topic, key
        self.registry = registry if isinstance(registry, Registry) else Registry(Path(registry))
        self.current, self.apply, self.rejected = current, apply, rejected
        self.allow_unsigned = allow_unsigned
        self.highest = after_seq  # the highest valid sequence number seen
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
        # What is on the topic already: only the freshest valid announcement counts (the
        # newest in offset order may be a replay appended after it), else the newest one.
        already: list[bytes] = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(*tps, timeout_ms=500)
            for records in batches.values():
                already += [r.value for r in records if r.key == UPDATE_KEY and r.value]
        if already:
            await self._consider(await asyncio.to_thread(self._freshest, already))
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=1000)
            for records in batches.values():
                for rec in records:
                    if rec.key == UPDATE_KEY and rec.value is not None:
                        await self._consider(rec.value)

    def _freshest(self, values: list[bytes]) -> bytes:
        best: tuple[int, bytes] | None = None
        try:
            registry_id = self.registry.identity()
        except (RegistryError, OSError):
            return values[-1]
        for raw in values:
            try:
                update = ModelUpdate.from_bytes(raw)
                check_authentic(
                    update, key=self.key, registry_id=registry_id, topic=self.topic,
                    allow_unsigned=self.allow_unsigned,
                )  # fmt: skip
            except UpdateRejected:
                continue
            if best is None or update.seq >= best[0]:
                best = (update.seq, raw)
        return best[1] if best is not None else values[-1]

    async def _consider(self, raw: bytes) -> None:
        self.seen += 1
        try:
            update = ModelUpdate.from_bytes(raw)
            registry_id = await asyncio.to_thread(self.registry.identity)
            check_authentic(
                update, key=self.key, registry_id=registry_id, topic=self.topic,
                allow_unsigned=self.allow_unsigned,
            )  # fmt: skip
            current = self.current()
            if update.seq <= self.highest and update.version == current.version:
                return  # the served version announced again (replayed or re-read): harmless
            check_authentic(
                update, key=self.key, registry_id=registry_id, topic=self.topic,
                allow_unsigned=self.allow_unsigned, after_seq=self.highest,
            )  # fmt: skip
            self.highest = update.seq
            if update.version == current.version:
                return
            log.info("model update %s announced (policy %s, sequence number %d); verifying",
                     update.version, update.policy, update.seq)  # fmt: skip
            verified = await asyncio.to_thread(
                verify_update, update, key=self.key, registry=self.registry, current=current,
                topic=self.topic, allow_unsigned=self.allow_unsigned,
                after_seq=update.seq - 1, device=self.device,
            )  # fmt: skip
        except UpdateRejected as err:
            self._refuse(err)
            return
        except (RegistryError, OSError) as err:  # the registry's id cannot be read
            self._refuse(UpdateRejected(reason="unreadable", detail=str(err)))
            return
        await self.apply(verified)

    def _refuse(self, err: UpdateRejected) -> None:
        log.warning("model update refused (%s): %s", err.reason, err)
        self.rejected(err)
