"""A worker's start-up on the real broker: the announced version is verified exactly as a
running worker verifies it; a refused one is reported and the newest good version serves.

Also: a registry worker without a key refuses to start unless unsigned updates are allowed.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafka_fixtures import unique_name
from stream_harness import REPO, tiny_checkpoint

from stream_rnn.ops.settings import Settings
from stream_rnn.registry import Registry, read_manifest
from stream_rnn.registry.keys import UpdateKey
from stream_rnn.registry.updates import Announcer, announce_production
from stream_rnn.stream.exceptions import StreamError
from stream_rnn.stream.follow import startup_model
from stream_rnn.stream.sensors import CountingSensor
from stream_rnn.stream.worker_app import start_from_registry, worker_update_key
from stream_rnn.stream.worker_options import WorkerOptions
from stream_rnn.train.vocab import Vocab

VOCAB = Vocab.build(["abcdefgh"], "char")
SECRET = base64.b64encode(os.urandom(32))


def _model(out: Path, seed: int) -> Path:
    return tiny_checkpoint(out, seed, VOCAB)


def _publish(reg: Registry, src: Path, announcer: Announcer) -> str:
    version = reg.add(src).version

    def change(r: Registry) -> str:
        r.promote(version, policy="keep")
        return version

    announce_production(reg, change, policy="keep", announcer=announcer)
    return version


def _flip_a_weight(where: Path) -> None:
    weights = where / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))


def test_a_tampered_announced_version_is_refused_at_start_and_the_previous_one_serves(
    kafka_broker: str, tmp_path: Path
) -> None:
    topic = unique_name("model-updates")
    key_file = tmp_path / "update.key"
    key_file.write_bytes(SECRET + b"\n")
    key_file.chmod(0o600)
    reg = Registry(tmp_path / "registry")
    announcer = Announcer(kafka_broker, topic, UpdateKey.hmac(SECRET))
    v1 = _publish(reg, _model(tmp_path / "m1", seed=1), announcer)
    v2 = _publish(reg, _model(tmp_path / "m2", seed=2), announcer)
    choice = startup_model(reg.root, kafka_broker, topic, key=UpdateKey.hmac(SECRET))
    assert (choice.version, choice.seq, choice.fallback) == (v2, 2, False)
    # the policy v2's announcement asked for goes to states restored from older versions
    assert choice.policy in ("keep", "reset", "rewarm") and choice.loaded is not None

    _flip_a_weight(reg.path(v2))  # someone with write access to the registry
    choice = startup_model(reg.root, kafka_broker, topic, key=UpdateKey.hmac(SECRET))
    assert (choice.version, choice.fallback) == (v1, True)
    assert choice.refusal is not None and choice.refusal.reason == "checksum"
    assert choice.seq == 2  # v2's announcement stays the freshest seen: v1 replays are stale

    # the worker's own start-up: options, status fields and the metric
    opts = WorkerOptions.from_settings(
        "", Settings(), bootstrap=kafka_broker, registry=reg.root,
        update_key_file=key_file, model_updates_topic=topic,
    )  # fmt: skip
    started, chosen = start_from_registry(opts)
    assert started.model_dir == reg.path(v1) and read_manifest(started.model_dir).version == v1
    # what was verified is what serves: the loaded model, not a second read of the files
    assert chosen.loaded is not None and chosen.loaded[1].version == v1
    assert chosen.policy is None  # v1 was not announced last: the registry's lineage decides
    assert started.serving_fallback and started.update_seq == 2
    assert started.startup_refusal is not None and started.startup_refusal.startswith("checksum:")
    sensor = CountingSensor()
    sensor.on_startup_refusal(started.startup_refusal.partition(":")[0])
    assert sensor.startup_refusals == {"checksum": 1}

    # nothing verifies: a clear error (exit 2 from the CLI), not a crash loop on a bad model
    _flip_a_weight(reg.path(v1))
    with pytest.raises(StreamError, match="no version of the registry .* verifies"):
        startup_model(reg.root, kafka_broker, topic, key=UpdateKey.hmac(SECRET))


def test_a_registry_worker_needs_a_key_or_an_explicit_allow(tmp_path: Path) -> None:
    opts = WorkerOptions.from_settings(
        "", Settings(), bootstrap="127.0.0.1:1", registry=tmp_path / "registry"
    )
    with pytest.raises(StreamError, match="needs --update-key-file"):
        worker_update_key(opts)
    allowed = WorkerOptions.from_settings(
        "", Settings(), bootstrap="127.0.0.1:1", registry=tmp_path, allow_unsigned_updates=True
    )
    assert worker_update_key(allowed) is None
    env_allowed = WorkerOptions.from_settings(
        "", Settings(allow_unsigned_updates=True), bootstrap="x:1", registry=tmp_path
    )
    assert env_allowed.allow_unsigned_updates
    # the CLI: exit 2 with the message, before it even looks for the broker
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rnn", "worker", "--registry", str(tmp_path / "registry"),
         "--bootstrap", "127.0.0.1:1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs --update-key-file" in proc.stderr, proc.stderr
