"""Announcements on the real broker: replays, other registries, start-up, racing publishers.

A captured announcement of v1, re-sent byte for byte (a raw producer) after v2, must not move
a running worker back, nor decide what a restarting worker serves; an announcement signed
with the same key for another registry is refused; two publishers racing end with the
production pointer and the last announcement naming the same version, sequence numbers
strictly increasing in topic order.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka_fixtures import unique_name
from stream_harness import tiny_checkpoint

from stream_rnn.registry import Manifest, Registry, UpdateRejected, read_manifest
from stream_rnn.registry.keys import UpdateKey
from stream_rnn.registry.updates import (
    UPDATE_KEY,
    Announcer,
    ModelUpdate,
    announce_production,
    read_updates,
)
from stream_rnn.registry.verify import VerifiedUpdate
from stream_rnn.stream.follow import ModelFollower, startup_model
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefgh"], "char")
KEY = UpdateKey.hmac(base64.b64encode(os.urandom(32)))


def _model(out: Path, seed: int) -> Path:
    return tiny_checkpoint(out, seed, VOCAB)


def _promote(version: str):
    def change(reg: Registry) -> str:
        reg.promote(version, policy="keep")
        return version

    return change


def _raw_send(bootstrap: str, topic: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, key=UPDATE_KEY, value=value).get(timeout=30)
    finally:
        producer.close()


class _Running:
    """A ModelFollower driven directly, with the worker's swap and rejection hooks."""

    def __init__(self, bootstrap: str, topic: str, registry: Registry, serving: Manifest) -> None:
        self.serving = serving
        self.rejected: list[UpdateRejected] = []
        self.follower = ModelFollower(
            bootstrap, topic, key=KEY, registry=registry, current=lambda: self.serving,
            apply=self._apply, rejected=self.rejected.append,
        )  # fmt: skip

    async def _apply(self, verified: VerifiedUpdate) -> None:
        self.serving = verified.manifest

    async def until(self, what: str, done, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)


def test_a_replayed_announcement_moves_no_worker_back(kafka_broker: str, tmp_path: Path) -> None:
    topic = unique_name("model-updates")
    reg = Registry(tmp_path / "registry")
    v1 = reg.add(_model(tmp_path / "m1", seed=1)).version
    v2 = reg.add(_model(tmp_path / "m2", seed=2)).version
    announcer = Announcer(kafka_broker, topic, KEY)
    announce_production(reg, _promote(v1), policy="keep", announcer=announcer)
    [captured] = read_updates(kafka_broker, topic)  # what an attacker on the topic saw
    assert captured is not None and ModelUpdate.from_bytes(captured).version == v1

    async def scenario() -> tuple[str, list[str]]:
        running = _Running(kafka_broker, topic, reg, read_manifest(reg.path(v1)))
        task = asyncio.create_task(running.follower.run())
        try:
            await asyncio.sleep(2)  # caught up with v1
            await asyncio.to_thread(
                announce_production, reg, _promote(v2), policy="keep", announcer=announcer
            )
            await running.until("v2", lambda: running.serving.version == v2)
            await asyncio.to_thread(_raw_send, kafka_broker, topic, captured)  # the replay
            await running.until("the replay refused", lambda: running.rejected)
            await asyncio.sleep(1)
            return running.serving.version, [e.reason for e in running.rejected]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    serving, reasons = asyncio.run(scenario())
    assert serving == v2 and reasons == ["stale"]

    # a worker starting now: the topic's newest record is the replay; v2 is served all the same
    choice = startup_model(reg.root, kafka_broker, topic, key=KEY)
    assert (choice.version, choice.seq, choice.refusal) == (v2, 2, None)
    # ... even if compaction had kept only the replay: the registry keeps its last announcement
    other_topic = unique_name("model-updates")
    _raw_send(kafka_broker, other_topic, captured)
    with pytest.raises(UpdateRejected, match="another registry or environment"):
        # v1's announcement is signed for the first topic: on another one it is refused
        from stream_rnn.registry.announce import check_authentic

        check_authentic(
            ModelUpdate.from_bytes(captured), key=KEY, registry_id=reg.identity(), topic=other_topic
        )

    async def fresh_follower() -> tuple[str, list[str]]:
        running = _Running(kafka_broker, topic, reg, read_manifest(choice.model_dir))
        running.follower.highest = choice.seq
        task = asyncio.create_task(running.follower.run())
        try:
            await asyncio.sleep(3)
            return running.serving.version, [e.reason for e in running.rejected]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(fresh_follower()) == (v2, [])


def test_an_announcement_for_another_registry_is_refused(kafka_broker: str, tmp_path: Path) -> None:
    topic = unique_name("model-updates")
    staging = Registry(tmp_path / "staging")  # same key, same topic, another environment
    prod = Registry(tmp_path / "prod")
    src1, src2 = _model(tmp_path / "m1", seed=1), _model(tmp_path / "m2", seed=2)
    v1 = prod.add(src1).version
    staging.add(src1)
    v2 = staging.add(src2).version
    prod.add(src2)
    announcer = Announcer(kafka_broker, topic, KEY)
    announce_production(prod, _promote(v1), policy="keep", announcer=announcer)

    async def scenario() -> tuple[str, list[str]]:
        running = _Running(kafka_broker, topic, prod, read_manifest(prod.path(v1)))
        task = asyncio.create_task(running.follower.run())
        try:
            await asyncio.sleep(2)
            await asyncio.to_thread(
                announce_production, staging, _promote(v2), policy="keep", announcer=announcer
            )
            await running.until("refusal", lambda: running.rejected)
            return running.serving.version, [e.reason for e in running.rejected]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario()) == (v1, ["domain"])


def test_racing_publishers_end_with_the_pointer_and_last_announcement_agreeing(
    kafka_broker: str, tmp_path: Path
) -> None:
    """A `retrain --every` (promotes new versions) and an operator (rolls back) race; each with
    its own Registry object on the same directory (flock, as two processes)."""
    topic = unique_name("model-updates")
    root = tmp_path / "registry"
    versions = [Registry(root).add(_model(tmp_path / f"m{i}", seed=i)).version for i in range(3)]
    announcer = Announcer(kafka_broker, topic, KEY)
    announce_production(Registry(root), _promote(versions[0]), policy="keep", announcer=announcer)
    errors: list[BaseException] = []

    def retrainer() -> None:
        reg = Registry(root)
        for i in range(12):
            announce_production(
                reg, _promote(versions[1 + i % 2]), policy="keep", announcer=announcer
            )

    def operator() -> None:
        reg = Registry(root)

        def rollback(r: Registry) -> str:
            if r.history():
                return r.rollback(policy="reset")
            r.promote(versions[0], policy="reset")
            return versions[0]

        for _ in range(12):
            announce_production(reg, rollback, policy="reset", announcer=announcer)

    def guarded(fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(f,)) for f in (retrainer, operator)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    updates = [ModelUpdate.from_bytes(v) for v in read_updates(kafka_broker, topic)]
    assert len(updates) == 25
    seqs = [u.seq for u in updates]
    assert seqs == sorted(set(seqs)) and seqs == list(range(1, 26))  # strictly increasing
    reg = Registry(root)
    assert reg.production() == updates[-1].version
    assert ModelUpdate.from_bytes(reg.last_announcement() or b"") == updates[-1]
    assert {p for _, p in reg.swap_history()} == {"keep", "reset"}  # as each one asked
