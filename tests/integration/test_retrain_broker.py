"""`stream-rnn retrain --from-topic` on the real broker: record, train, publish, announce.

Labelled sequences go to a tokens topic through the project's producer (the label rides on
each `end`); production v1 is a classifier that always answers A, published and announced with
`stream-rnn models publish`. The retraining run must record the topic, beat v1, register v2 with
v1 as its parent and announce v2 (signed, with the requested policy) on the model-updates topic,
where a worker running v1 reads and verifies it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kafka.admin import KafkaAdminClient
from kafka_fixtures import TopicFactory, unique_name
from stream_harness import REPO, run_cli

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.producer import TokenProducer, produce_records
from stream_rnn.registry import Registry, read_manifest, save_checkpoint
from stream_rnn.registry.updates import read_current_update, verify_signature, verify_update
from stream_rnn.train.data import Record
from stream_rnn.train.vocab import Vocab

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
KEY = b"0123456789abcdef0123456789abcdef"


def _labelled(n: int, seed: int) -> list[Record]:
    """Sequences over "ab" are labelled A, over "cd" B."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice("AB")
        chars = "ab" if label == "A" else "cd"
        text = "".join(rng.choice(chars) for _ in range(rng.randint(4, 10)))
        out.append(Record(f"user-{seed}-{i}", text=text, label=label))
    return out


def _always_a(out: Path) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.build(["abcd"], "char")
    cfg = ModelConfig(
        task="classify", cell="gru", vocab_size=len(vocab), embed_dim=8, hidden_size=16,
        num_labels=2,
    )  # fmt: skip
    model = RecurrentModel(cfg)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.tensor([1.0, 0.0]))
    save_checkpoint(out, model.eval(), vocab=vocab.to_dict(), labels=["A", "B"])
    return out


@pytest.fixture
def updates_topic(kafka_broker: str) -> Iterator[str]:
    name = unique_name("model-updates")
    yield name
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-retrain")
    try:
        if name in admin.list_topics():
            admin.delete_topics([name], timeout_ms=10_000)
    finally:
        admin.close()


def test_retrain_from_topic_publishes_v2_and_announces_it(
    kafka_broker: str, topic_factory: TopicFactory, updates_topic: str, tmp_path: Path
) -> None:
    tokens = topic_factory("tokens", partitions=2)
    with TokenProducer(kafka_broker, tokens) as producer:
        produce_records(_labelled(80, seed=0), producer, level="char", interleave_seed=1)
        # an unlabelled sequence and an open one: the recorder leaves both out for classify
        for ch in "abab":
            producer.send_token("no-label", ch)
        producer.send_end("no-label")
        producer.send_token("still-open", "c")

    key_file = tmp_path / "update.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    registry = tmp_path / "registry"
    v1_dir = _always_a(tmp_path / "v1")
    v1 = read_manifest(v1_dir).version
    announce = ["--bootstrap", kafka_broker, "--update-key-file", str(key_file)]
    run_cli("models", "publish", str(v1_dir), "--registry", str(registry), "--topic", updates_topic, *announce)  # fmt: skip
    first = read_current_update(kafka_broker, updates_topic)
    assert first is not None and first.version == v1

    prom = tmp_path / "retrain.prom"
    out = run_cli(
        "retrain", "--registry", str(registry), "--from-topic", "--topic", tokens, "--last", "1h",
        "--updates-topic", updates_topic, "--policy", "keep", "--metrics-file", str(prom),
        "--epochs", "8", "--lr", "0.02", "--batch-size", "8", *announce,
    )  # fmt: skip

    reg = Registry(registry)
    v2 = reg.production()
    assert v2 is not None and v2 != v1
    assert reg.lineage(v2) == [v2, v1] and reg.history() == [v1]
    info = reg.show(v2)
    window = info.data_window
    assert window is not None and window["source"] == "topic" and window["topic"] == tokens
    assert window["last"] == "1h" and window["until_ms"] - window["since_ms"] == 3_600_000
    assert info.metrics["holdout"]["accuracy"] > info.metrics["production_holdout"]["accuracy"]

    entry = json.loads((registry / "retrain.jsonl").read_text().splitlines()[-1])
    assert entry["decision"] == "published" and entry["version"] == v2
    assert entry["announced"] is True and entry["policy"] == "keep"
    assert entry["rows"]["recorded"] == 80  # the unlabelled and the open sequence left out
    assert entry["rows"]["holdout"] == 16
    assert f"retrain published {v2} (parent {v1}, policy keep, announced)" in out
    assert "recorded 80 sequences" in out and "signed" in out

    update = read_current_update(kafka_broker, updates_topic)
    assert update is not None and update.version == v2 and update.policy == "keep"
    assert update.seq == 2 and update.registry_id == Registry(registry).identity()
    verify_signature(update, KEY)
    # a worker running v1 takes it and keeps its states: same architecture and vocabulary
    verified = verify_update(
        update, key=KEY, registry=registry, topic=updates_topic, current=read_manifest(v1_dir)
    )
    assert verified.policy == "keep" and verified.note is None
    assert 'stream_rnn_retrain_runs_total{decision="published"} 1.0' in prom.read_text()

    # an empty window: refused, logged, production and announcement unchanged
    empty = topic_factory("tokens-empty", partitions=1)
    proc_out = _fails(
        "retrain", "--registry", str(registry), "--from-topic", "--topic", empty, "--last", "1h",
        "--updates-topic", updates_topic, *announce,
    )  # fmt: skip
    assert "no recorded sequences in topic" in proc_out and "label" in proc_out
    assert reg.production() == v2
    last = read_current_update(kafka_broker, updates_topic)
    assert last is not None and last.version == v2
    decisions = [json.loads(x)["decision"] for x in (registry / "retrain.jsonl").read_text().splitlines()]  # fmt: skip
    assert decisions == ["published", "failed"]


def _fails(*args: str) -> str:
    """Run ``stream-rnn ARGS``, expect exit status 2 without a traceback; its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rnn", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    return proc.stderr + proc.stdout
