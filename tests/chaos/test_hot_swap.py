"""Hot swap on the real broker: a worker serving the registry's v1 swaps in an announced v2.

Phase 1 streams tokens under v1; `stream-rnn models publish v2 --policy P` announces v2 on the
model-updates topic; the worker must serve it within 10 s; phase 2 streams more tokens to the
same keys (and new ones). Every prediction names the version that produced it and equals the
offline pass of that version with the policy applied at the swap point:

* keep: v2 continues from v1's state after phase 1;
* reset: v2 from a fresh state over phase 2 only;
* rewarm: v2 over the key's retained history (all of phase 1, shorter than ``--history``) and
  then phase 2, i.e. v2's full pass over both phases.

The second test refuses what must be refused (unsigned, wrongly signed, a tampered weights
file) while v1 keeps serving with unchanged outputs, then rolls back from v2 to v1.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from chaos_harness import (
    ALPHABET,
    CHAOS_ENV,
    KeyLog,
    TokenLoad,
    produce,
    read_log,
    read_predictions_raw,
    tiny_model,
)
from chaos_harness import wait_consumed as wait_drained
from kafka_fixtures import unique_name
from stream_harness import (
    StreamTopics,
    StreamTopicsFactory,
    WorkerProcess,
    assert_same_top_k,
    run_cli,
)

from stream_rnn.ops.processes import find_free_port
from stream_rnn.registry.checkpoint import load_checkpoint, read_manifest
from stream_rnn.train.vocab import Vocab

KEYS = 24
PHASE_TOKENS = 8
HISTORY = 32
SWAP_WITHIN_S = 10.0


class Deployment:
    """A registry, a model-updates topic and the workers that follow them, for one test."""

    def __init__(self, tmp: Path, bootstrap: str, topics: StreamTopics) -> None:
        self.tmp, self.bootstrap, self.topics = tmp, bootstrap, topics
        self.registry = tmp / "registry"
        self.updates = unique_name("model-updates")
        self.workers: list[WorkerProcess] = []

    def models(self, *args: str, key: Path | None = None) -> str:
        extra = ["--update-key-file", str(key)] if key is not None else []
        return run_cli(
            "models", *args, "--registry", str(self.registry), "--bootstrap", self.bootstrap,
            "--topic", self.updates, *extra,
        )  # fmt: skip

    def worker(
        self, *args: str, group: str | None = None, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        t = self.topics
        argv = [
            "--registry", str(self.registry), "--bootstrap", self.bootstrap,
            "--group", group or unique_name("swap"), *t.worker_args(),
            "--history", str(HISTORY), *args,
        ]  # fmt: skip
        if "--update-key-file" not in args:  # these tests publish unsigned
            argv.append("--allow-unsigned-updates")
        env = {
            "STREAM_RNN_WORKER_DIR": str(self.tmp / "workers"),
            "STREAM_RNN_MODEL_UPDATES_TOPIC": self.updates,
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        port = find_free_port(exclude=frozenset(w.port for w in self.workers))
        w = WorkerProcess(argv, port, self.tmp / f"worker-{len(self.workers)}.log", env)
        self.workers.append(w)
        return w

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.fixture
def deployment(tmp_path: Path, kafka_broker: str, stream_topics: StreamTopicsFactory) -> Any:
    dep = Deployment(tmp_path, kafka_broker, stream_topics(partitions=4))
    try:
        yield dep
    finally:
        dep.stop()


def _stream(dep: Deployment, worker: WorkerProcess, keys: list[str], seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    pairs = [
        (k, ALPHABET[int(i)])
        for _ in range(PHASE_TOKENS)
        for k in keys
        for i in torch.randint(len(ALPHABET), (1,), generator=rng)
    ]
    produce(dep.bootstrap, dep.topics.tokens, pairs)
    group = worker.status()["group"]  # type: ignore[index]
    wait_drained(dep.bootstrap, group, dep.topics, timeout=120, workers=lambda: [worker])


def _swap_to(worker: WorkerProcess, version: str, since: float | None = None) -> float:
    """Wait until ``worker`` serves ``version``; seconds since ``since`` (default: now)."""
    t0 = time.monotonic() if since is None else since
    worker.wait_until(lambda s: s["model_version"] == version, f"serving {version}", timeout=60)
    return time.monotonic() - t0


@torch.inference_mode()
def _expected(
    v1: Path, v2: Path, policy: str, log: KeyLog, cut: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Top-5 (probs, ids) after every token of ``log`` and the version that produced each."""
    m1, _ = load_checkpoint(v1)
    m2, _ = load_checkpoint(v2)
    stoi = Vocab.from_tokens(ALPHABET, "char").stoi
    ids = torch.tensor([[stoi[t] for t in log.tokens]])
    if cut == 0:  # a key first seen after the swap: v2 from a fresh state, whatever the policy
        top = torch.softmax(m2(ids)[0][0], dim=-1).topk(5, dim=-1)
        return top.values, top.indices, ["v2"] * len(log.tokens)
    if cut == len(log.tokens):  # never saw v2
        top = torch.softmax(m1(ids)[0][0], dim=-1).topk(5, dim=-1)
        return top.values, top.indices, ["v1"] * cut
    logits1, state1 = m1(ids[:, :cut])
    if policy == "keep":
        logits2, _ = m2(ids[:, cut:], state1)
    elif policy == "reset":
        logits2, _ = m2(ids[:, cut:])
    else:  # rewarm: the history holds all of phase 1
        logits2 = m2(ids)[0][:, cut:]
    top = torch.softmax(torch.cat([logits1, logits2], dim=1)[0], dim=-1).topk(5, dim=-1)
    return top.values, top.indices, [*(["v1"] * cut), *(["v2"] * (len(log.tokens) - cut))]


@pytest.mark.parametrize("policy", ["keep", "reset", "rewarm"])
def test_a_published_version_is_swapped_in_and_states_follow_the_policy(
    deployment: Deployment, tmp_path: Path, policy: str
) -> None:
    dep = deployment
    v1 = tiny_model(tmp_path / "v1", seed=1)
    v2 = tiny_model(tmp_path / "v2", seed=2)
    versions = {"v1": read_manifest(v1).version, "v2": read_manifest(v2).version}
    dep.models("publish", str(v1), "--policy", policy)
    worker = dep.worker()
    worker.wait_until(lambda s: len(s["assigned"]) == 4, "all 4 partitions assigned")
    assert worker.status()["model_version"] == versions["v1"]  # type: ignore[index]

    old = [f"k{i:03d}" for i in range(KEYS)]
    _stream(dep, worker, old, seed=1)
    published = time.monotonic()  # the CLI's own start-up included
    dep.models("publish", str(v2), "--policy", policy)
    took = _swap_to(worker, versions["v2"], since=published)
    assert took < SWAP_WITHIN_S, f"the swap took {took:.1f}s"
    new = [f"n{i:03d}" for i in range(KEYS // 2)]
    _stream(dep, worker, old + new, seed=2)
    status = worker.status() or {}
    assert worker.stop() == 0, worker.log_tail()

    [swap] = [status["last_swap"]]
    assert status["model_swaps"] == 1 and swap["policy"] == policy, swap
    logs = read_log(dep.bootstrap, dep.topics)
    preds = {p["id"]: p for p in read_predictions_raw(dep.bootstrap, dep.topics)}
    itos = Vocab.from_tokens(ALPHABET, "char").itos
    checked = 0
    for key, log in logs.items():
        cut = PHASE_TOKENS if key in old else 0
        probs, top_ids, names = _expected(v1, v2, policy, log, cut)
        for i, off in enumerate(log.offsets):
            pred = preds.pop(f"{log.partition}:{off}")
            assert pred["model_version"] == versions[names[i]], (key, i, pred)
            want = {"tokens": [itos[t] for t in top_ids[i].tolist()], "probs": probs[i].tolist()}
            assert_same_top_k(pred["next"], want, f"{policy} {key}@{i}")
            checked += 1
    assert not preds, f"{len(preds)} predictions for no token"
    assert checked == KEYS * PHASE_TOKENS * 2 + (KEYS // 2) * PHASE_TOKENS
    print(f"\nhot swap ({policy}): served v2 {took:.2f}s after publishing; pause "
          f"{swap['pause_s'] * 1000:.1f} ms; {checked} predictions equal the offline pass")  # fmt: skip


def test_refused_updates_leave_the_model_serving_and_rollback_returns(
    deployment: Deployment, tmp_path: Path
) -> None:
    dep = deployment
    key = tmp_path / "update.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    os.chmod(key, 0o600)
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(os.urandom(32)).decode())
    os.chmod(wrong, 0o600)
    v1 = tiny_model(tmp_path / "v1", seed=1)
    v2 = tiny_model(tmp_path / "v2", seed=2)
    v3 = tiny_model(tmp_path / "v3", seed=3)
    names = {read_manifest(d).version: n for n, d in (("v1", v1), ("v2", v2), ("v3", v3))}
    dep.models("publish", str(v1), "--policy", "keep", key=key)
    worker = dep.worker("--update-key-file", str(key))
    worker.wait_until(lambda s: len(s["assigned"]) == 4, "all 4 partitions assigned")
    serving = worker.status()["model_version"]  # type: ignore[index]
    assert names[serving] == "v1"
    keys = [f"k{i:03d}" for i in range(KEYS)]
    _stream(dep, worker, keys, seed=1)

    def refused(reason: str, count: int = 1) -> None:
        worker.wait_until(
            lambda s: s["model_updates_rejected"].get(reason, 0) >= count, f"refused: {reason}"
        )
        assert worker.status()["model_version"] == serving  # type: ignore[index]

    dep.models("publish", str(v2))  # unsigned
    refused("unsigned")
    dep.models("promote", read_manifest(v2).version, key=wrong)
    refused("bad_signature")
    dep.models("publish", str(v3), "--no-announce", key=key)
    weights = dep.registry / "versions" / read_manifest(v3).version / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    os.chmod(weights, 0o644)
    weights.write_bytes(bytes(data))
    dep.models("promote", read_manifest(v3).version, key=key)
    refused("checksum")
    _stream(dep, worker, keys, seed=2)  # still v1, and nothing lost
    # rollback: the previous production version (v2, promoted above) is announced, signed
    dep.models("rollback", key=key)
    _swap_to(worker, read_manifest(v2).version)
    status = worker.status() or {}
    assert worker.stop() == 0, worker.log_tail()
    preds = read_predictions_raw(dep.bootstrap, dep.topics)
    assert len(preds) == 2 * KEYS * PHASE_TOKENS
    assert {names[p["model_version"]] for p in preds} == {"v1"}
    assert status["model_swaps"] == 1
    shutil.rmtree(dep.registry, ignore_errors=True)


def test_a_swap_in_the_middle_of_the_kill_loop_stays_exactly_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Two workers under a steady load, SIGKILLed and replaced at random; v2 is published
    (keep) after the second kill. Every token is answered once, by v1 up to its key's swap
    point and by v2 after it (a key never goes back), each equal to the offline pass."""
    dep = deployment
    v1 = tiny_model(tmp_path / "v1", seed=1)
    v2 = tiny_model(tmp_path / "v2", seed=2)
    names = {read_manifest(v1).version: "v1", read_manifest(v2).version: "v2"}
    dep.models("publish", str(v1), "--policy", "keep")
    group = unique_name("swap-kill")

    def start() -> WorkerProcess:
        # states restored under another version continue (keep), as the announcement says
        return dep.worker("--swap-policy", "keep", "--max-batch", "256", group=group,
                          env=CHAOS_ENV)  # fmt: skip

    workers = [start(), start()]
    for w in workers:
        w.wait_until(lambda s: bool(s["assigned"]), "partitions assigned")
    rng = random.Random(9)
    keys = [f"user-{i:03d}" for i in range(120)]
    load = TokenLoad(dep.bootstrap, dep.topics.tokens, keys, n=8_000, rate=250.0, seed=9)
    load.start()
    kills = 0
    deadline = time.monotonic() + 150
    while (load.is_alive() or kills < 4) and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 3.0))
        victim = rng.randrange(2)
        workers[victim].proc.kill()
        workers[victim].proc.wait(10)
        kills += 1
        if kills == 2:
            dep.models("publish", str(v2), "--policy", "keep")
        workers[victim] = start()
        workers[victim].wait_until(lambda s: bool(s["assigned"]), "reassigned", 60)
    load.join(120)
    assert load.error is None and load.sent == 8_000, load.error
    wait_drained(dep.bootstrap, group, dep.topics, timeout=120, workers=lambda: workers)
    for w in workers:
        assert w.stop() == 0, w.log_tail()

    logs = read_log(dep.bootstrap, dep.topics)
    preds = read_predictions_raw(dep.bootstrap, dep.topics)
    by_id = {p["id"]: p for p in preds}
    assert len(by_id) == len(preds) == 8_000, "duplicates or losses"
    itos = Vocab.from_tokens(ALPHABET, "char").itos
    swapped = 0
    for key, log in logs.items():
        got = [by_id[f"{log.partition}:{off}"] for off in log.offsets]
        versions = [names[p["model_version"]] for p in got]
        cut = versions.index("v2") if "v2" in versions else len(versions)
        assert versions == ["v1"] * cut + ["v2"] * (len(versions) - cut), (key, versions)
        swapped += cut < len(versions)
        probs, top_ids, _ = _expected(v1, v2, "keep", log, cut)
        for i, pred in enumerate(got):
            want = {"tokens": [itos[t] for t in top_ids[i].tolist()], "probs": probs[i].tolist()}
            assert_same_top_k(pred["next"], want, f"{key}@{i}")
    assert swapped > len(logs) // 2, f"only {swapped} keys saw v2"
    print(f"\nswap in the kill loop: {kills} SIGKILLs, 8,000 predictions once each, "
          f"{swapped} of {len(logs)} keys swapped v1 -> v2 (keep), all equal to the offline pass")  # fmt: skip


def test_a_retrained_version_reaches_a_live_worker(deployment: Deployment, tmp_path: Path) -> None:
    """The learning loop end to end: a worker serves an untrained v1; `stream-rnn retrain
    --from-topic` records what streamed, trains v2 from v1, finds it better on the held-out
    sequences, publishes and announces it; the worker serves v2 within 10 s, and every
    prediction after that names v2."""
    dep = deployment
    v1 = tiny_model(tmp_path / "v1", seed=1)
    dep.models("publish", str(v1))
    worker = dep.worker()
    worker.wait_until(lambda s: len(s["assigned"]) == 4, "all 4 partitions assigned")
    # learnable: every key cycles through a short pattern of its own
    pattern = {f"s{i:03d}": ALPHABET[i % 5 : i % 5 + 3] for i in range(80)}
    pairs = [(k, p[j % len(p)]) for j in range(24) for k, p in pattern.items()]
    produce(dep.bootstrap, dep.topics.tokens, pairs)
    group = worker.status()["group"]  # type: ignore[index]
    wait_drained(dep.bootstrap, group, dep.topics, timeout=120, workers=lambda: [worker])
    out = run_cli(
        "retrain", "--registry", str(dep.registry), "--from-topic", "--bootstrap",
        dep.bootstrap, "--topic", dep.topics.tokens, "--last", "1h", "--updates-topic",
        dep.updates, "--epochs", "3", "--lr", "0.01", "--policy", "keep", timeout=300,
    )  # fmt: skip
    published = time.monotonic()
    assert "published" in out, out
    production = json.loads((dep.registry / "production.json").read_text())["version"]
    assert production != read_manifest(v1).version
    took = _swap_to(worker, production, since=published)
    assert took < SWAP_WITHIN_S, f"v2 reached the worker {took:.1f}s after retrain ended"
    produce(dep.bootstrap, dep.topics.tokens, [(k, p[0]) for k, p in pattern.items()])
    wait_drained(dep.bootstrap, group, dep.topics, timeout=120, workers=lambda: [worker])
    assert worker.stop() == 0, worker.log_tail()
    preds = read_predictions_raw(dep.bootstrap, dep.topics)
    last = {}
    for p in sorted(preds, key=lambda p: int(p["id"].split(":")[1])):
        last[p["key"]] = p["model_version"]
    assert set(last.values()) == {production}, "a prediction after the swap named another version"
    print(f"\nlearning loop: retrain published {production}; the worker served it {took:.2f}s "
          f"after retrain exited (0: before the command had finished)")  # fmt: skip
