"""`stream-rnn models` on the real broker: publish, announce, promote and roll back.

The announcements are read back from the compacted model-updates topic the way a worker
reads them (`read_current_update`) and verified the way a worker verifies them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka_fixtures import unique_name
from stream_harness import REPO, run_cli

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.processes import find_free_port
from stream_rnn.registry import Registry, UpdateRejected, read_manifest, save_checkpoint
from stream_rnn.registry.updates import (
    load_update_key,
    read_current_update,
    verify_signature,
    verify_update,
)
from stream_rnn.train.vocab import Vocab

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
VOCAB = Vocab.build(["abcdefgh"], "char")
KEY = b"0123456789abcdef0123456789abcdef"


def _model(out: Path, *, hidden: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="next-token", cell="gru", vocab_size=len(VOCAB), embed_dim=4, hidden_size=hidden
    )
    save_checkpoint(out, RecurrentModel(cfg).eval(), vocab=VOCAB.to_dict())
    return out


def _fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``stream-rnn ARGS``, expect exit status 2 and return its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rnn", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr + proc.stdout
    return proc.stderr


@pytest.fixture
def updates_topic(kafka_broker: str) -> Iterator[str]:
    name = unique_name("model-updates")
    yield name
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-models")
    try:
        if name in admin.list_topics():
            admin.delete_topics([name], timeout_ms=10_000)
    finally:
        admin.close()


def test_publish_promote_rollback_are_announced(
    kafka_broker: str, updates_topic: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "update.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o600)
    registry = tmp_path / "registry"
    m1 = _model(tmp_path / "m1", hidden=8, seed=0)
    m2 = _model(tmp_path / "m2", hidden=16, seed=1)
    v1, v2 = read_manifest(m1).version, read_manifest(m2).version
    common = ["--registry", str(registry), "--bootstrap", kafka_broker, "--topic", updates_topic]
    env = {"STREAM_RNN_UPDATE_KEY_FILE": str(key_file)}

    assert read_current_update(kafka_broker, updates_topic) is None  # no topic yet

    out = run_cli("models", "publish", str(m1), *common, "--policy", "keep", env=env)
    assert f"production: none -> {v1}" in out and "signed" in out
    first = read_current_update(kafka_broker, updates_topic)
    assert first is not None and first.version == v1 and first.policy == "keep"
    assert first.registry_id == Registry(registry).identity() and first.seq == 1
    assert first.topic == updates_topic and first.alg == "hmac-sha256"
    verify_signature(first, KEY)

    # the key given as a flag instead of the environment
    out = run_cli(
        "models", "publish", str(m2), *common, "--update-key-file", str(key_file),
        "--policy", "keep",
    )  # fmt: skip
    assert f"production: {v1} -> {v2}" in out
    second = read_current_update(kafka_broker, updates_topic)
    assert second is not None and second.version == v2
    # what a worker running v1 makes of it: a wider model cannot keep v1's states
    verified = verify_update(
        second, key=KEY, registry=registry, topic=updates_topic, current=read_manifest(m1)
    )
    assert verified.policy == "rewarm" and "hidden_size 8 -> 16" in str(verified.note)

    listing = run_cli("models", "list", "--registry", str(registry))
    assert v1 in listing and v2 in listing
    assert [line for line in listing.splitlines() if "*" in line and v2 in line]
    shown = run_cli("models", "show", v2, "--registry", str(registry))
    assert "(production)" in shown and "hidden_size=16" in shown

    out = run_cli("models", "rollback", *common, env=env)
    assert f"rolled back: production {v2} -> {v1}" in out
    back = read_current_update(kafka_broker, updates_topic)
    assert back is not None and back.version == v1 and back.policy == "rewarm"
    assert back.published_at > second.published_at and back.seq == second.seq + 1
    verify_signature(back, KEY)
    assert Registry(registry).production() == v1

    out = run_cli("models", "promote", v2, *common, "--policy", "reset", env=env)
    assert f"production: {v1} -> {v2}" in out
    latest = read_current_update(kafka_broker, updates_topic)
    assert latest is not None and (latest.version, latest.policy) == (v2, "reset")
    assert Registry(registry).history() == [v1]
    assert Registry(registry).swap_history() == [
        (v1, "keep"), (v2, "keep"), (v1, "rewarm"), (v2, "reset")
    ]  # fmt: skip

    # the topic: compacted, one partition, created by the first publish
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-models-check")
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, updates_topic)
        configs = admin.describe_configs([resource])["topic"][updates_topic]
        assert configs["cleanup.policy"]["value"] == "compact"
        [described] = admin.describe_topics([updates_topic])
        assert len(described["partitions"]) == 1
    finally:
        admin.close()


def test_user_errors_are_one_line_and_change_nothing(
    kafka_broker: str, updates_topic: str, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    m1 = _model(tmp_path / "m1", hidden=8, seed=0)
    common = ["--registry", str(registry), "--bootstrap", kafka_broker, "--topic", updates_topic]
    key_file = tmp_path / "update.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o644)

    err = _fails("models", "publish", str(m1), *common, "--update-key-file", str(key_file))
    assert err.count("\n") == 1 and "chmod 600" in err
    assert Registry(registry).list() == []  # the key is checked before the registry changes

    out = run_cli("models", "publish", str(m1), *common)
    assert "UNSIGNED" in out and "workers refuse it unless" in out
    unsigned = read_current_update(kafka_broker, updates_topic)
    assert unsigned is not None and unsigned.signature is None

    # an unreachable broker is found before the registry changes
    m2 = _model(tmp_path / "m2", hidden=8, seed=1)
    nowhere = f"127.0.0.1:{find_free_port()}"
    err = _fails("models", "publish", str(m2), "--registry", str(registry), "--bootstrap", nowhere)
    assert f"cannot reach Kafka at {nowhere}" in err and "--no-announce" in err
    assert [i.version for i in Registry(registry).list()] == [read_manifest(m1).version]

    err = _fails("models", "promote", "m-nope", *common)
    assert err.startswith("error: version 'm-nope' is not in the registry") and err.count("\n") == 1
    err = _fails("models", "rollback", *common)
    assert "no earlier production version to roll back to" in err and err.count("\n") == 1

    # whatever else writes to the topic: a newest record that is no announcement is refused
    producer = KafkaProducer(bootstrap_servers=kafka_broker)
    producer.send(updates_topic, key=b"production", value=b"{garbage").get(timeout=30)
    producer.close()
    with pytest.raises(UpdateRejected) as info:
        read_current_update(kafka_broker, updates_topic)
    assert info.value.reason == "malformed"


def test_keygen_pair_signs_with_the_private_key_and_verifies_with_the_public(
    kafka_broker: str, updates_topic: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    out = run_cli("models", "keygen", "--out", str(keys))
    assert "update.key" in out and "update.pub" in out
    assert (keys / "update.key").stat().st_mode & 0o777 == 0o600
    assert "PUBLIC KEY" in (keys / "update.pub").read_text()
    registry = tmp_path / "registry"
    m1 = _model(tmp_path / "m1", hidden=8, seed=0)
    common = ["--registry", str(registry), "--bootstrap", kafka_broker, "--topic", updates_topic]
    # a worker's public key cannot sign
    err = _fails(
        "models", "publish", str(m1), *common, "--update-key-file", str(keys / "update.pub")
    )
    assert "public key" in err and "cannot sign" in err
    out = run_cli(
        "models", "publish", str(m1), *common, "--update-key-file", str(keys / "update.key")
    )
    assert "signed ed25519" in out
    update = read_current_update(kafka_broker, updates_topic)
    assert update is not None and update.alg == "ed25519" and len(update.signature or "") == 128
    public = load_update_key(keys / "update.pub")
    verify_signature(update, public)
    verified = verify_update(
        update, key=public, registry=registry, topic=updates_topic, current=read_manifest(m1)
    )
    assert verified.manifest.version == read_manifest(m1).version
    # the same message checked with an HMAC secret: refused (no algorithm confusion)
    with pytest.raises(UpdateRejected, match="signed with ed25519 but") as info:
        verify_signature(update, KEY)
    assert info.value.reason == "bad_signature"
    assert "exists" in _fails("models", "keygen", "--out", str(keys))  # never overwritten
