"""Helpers of the chaos tests: tiny models, a steady background load, and the exactness check.

The check works from the outside, from what is on the broker after the workers stopped:

* the tokens topic, read back, is the truth of what each key received (t1..tn in offset order:
  a producer retry that wrote a token twice is two tokens of the key, and the workers must
  apply both);
* the state topic holds every key's final state (highest applied offset wins, as a restore
  reads it): it must equal the offline full-sequence pass over the key's tokens, h and c, to
  1e-5, and carry the key's last offset and token count;
* the predictions topic holds at least one prediction per token offset (at-least-once; exactly
  one for a read_committed reader under exactly-once), and every copy of every prediction
  equals the offline one at its position (top-5 probabilities to 1e-5, candidates swapping
  places only between near-ties).

Example::

    model_dir = tiny_model(tmp_path)
    load = TokenLoad(bootstrap, topics.tokens, keys, n=20_000, rate=300.0)
    load.start(); ...; load.join()
    verdict = verify_exact(bootstrap, topics, model_dir)
    print(verdict.summary())
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from stream_harness import TOL, StreamTopics, WorkerFactory, WorkerProcess, assert_same_top_k

from stream_rnn.engine.store import StoredState, decode_state
from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.processes import WorkerHandle
from stream_rnn.registry.checkpoint import load_checkpoint, save_checkpoint
from stream_rnn.stream.codec import decode_prediction
from stream_rnn.stream.state import restore_partition
from stream_rnn.stream.topics import state_topic
from stream_rnn.train.vocab import Vocab

ALPHABET = tuple("abcdefghijklmnopqrstuvwxyz")
# Workers of the chaos tests: a crashed worker's partitions move after 6 s (the broker's
# group.min.session.timeout.ms), not faust's 60 s; checkpoints every second keep the replay
# after a crash short.
CHAOS_ENV = {
    "STREAM_RNN_SESSION_TIMEOUT_S": "6",
    "STREAM_RNN_CHECKPOINT_INTERVAL_S": "1",
}
READ_IDLE_S = 3.0


def tiny_model(
    out: Path,
    *,
    cell: str = "gru",
    layers: int = 1,
    hidden: int = 16,
    embed: int = 8,
    seed: int = 0,
) -> Path:
    """A random-weight next-token checkpoint over ``ALPHABET`` (exactness needs no training)."""
    vocab = Vocab.from_tokens(ALPHABET, "char")
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="next-token",
        cell=cell,
        vocab_size=len(vocab),
        embed_dim=embed,
        hidden_size=hidden,
        num_layers=layers,
    )
    model_dir = out / f"model-{cell}-{layers}x{hidden}"
    save_checkpoint(model_dir, RecurrentModel(cfg).eval(), vocab=vocab.to_dict())
    return model_dir


def token_value(token: str) -> bytes:
    """The wire form of a token event, written by hand as a third-party producer would."""
    return orjson.dumps({"v": 1, "type": "token", "token": token, "ts": time.time()})


def new_producer(bootstrap: str, **config: Any) -> KafkaProducer:
    """kafka-python producer that keeps per-key order through retries (idempotent, acks=all)."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        **config,
    )


def produce(bootstrap: str, topic: str, pairs: Iterable[tuple[str, str]]) -> int:
    """Send ``(key, token)`` pairs as fast as the broker takes them; wait for every ack."""
    producer = new_producer(bootstrap, batch_size=256 * 1024)
    sent = 0
    try:
        for key, token in pairs:
            producer.send(topic, key=key.encode(), value=token_value(token))
            sent += 1
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)
    return sent


class TokenLoad(threading.Thread):
    """Background producer: ``n`` random tokens to random ``keys`` at a steady ``rate``/s.

    Tokens are drawn from ``alphabet`` (default `ALPHABET`). Errors are kept in ``error`` (the
    test asserts on it after ``join()``); ``stop()`` ends the load early. Sends are paced in 20 ms slices, so the load keeps flowing while workers die.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        keys: Sequence[str],
        *,
        n: int,
        rate: float,
        seed: int = 0,
        max_s: float = 300.0,
        alphabet: Sequence[str] = ALPHABET,
    ) -> None:
        super().__init__(name="token-load", daemon=True)
        self.bootstrap, self.topic, self.keys = bootstrap, topic, list(keys)
        self.alphabet = tuple(alphabet)
        self.n, self.rate, self.max_s = n, rate, max_s
        self.rng = random.Random(seed)
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            # Retries must outlast a broker restart: the default 120 s delivery timeout does.
            producer = new_producer(self.bootstrap, retries=1_000_000)
            try:
                start = time.monotonic()
                while self.sent < self.n and not self._halt.is_set():
                    if time.monotonic() - start > self.max_s:
                        raise TimeoutError(f"load sent only {self.sent} of {self.n} tokens")
                    due = min(self.n, int((time.monotonic() - start) * self.rate) + 1)
                    for _ in range(due - self.sent):
                        key = self.rng.choice(self.keys)
                        token = self.rng.choice(self.alphabet)
                        producer.send(self.topic, key=key.encode(), value=token_value(token))
                        self.sent += 1
                    time.sleep(0.02)
                producer.flush(timeout=180)
            finally:
                producer.close(timeout=30)
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.error = err

    def stop(self) -> None:
        self._halt.set()


class ChaosWorkers:
    """Starts workers of one group on one set of topics, with the chaos settings.

    Example::

        workers = ChaosWorkers(worker_factory, model_dir, topics, "g1", "--max-batch", "256")
        first = workers.start()
    """

    def __init__(
        self,
        factory: WorkerFactory,
        model_dir: Path,
        topics: StreamTopics,
        group: str,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.factory, self.model_dir, self.topics, self.group = factory, model_dir, topics, group
        self.args = args
        self.env = {**CHAOS_ENV, **(env or {})}
        self.started: list[WorkerProcess] = []

    def start(self, *extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
        """One more worker of the group (``extra`` flags and ``env`` for this one only)."""
        worker = self.factory(
            self.model_dir,
            *self.topics.worker_args(),
            *self.args,
            *extra,
            group=self.group,
            env={**self.env, **(env or {})},
        )
        self.started.append(worker)
        return worker

    def start_assigned(self, n: int) -> list[WorkerProcess]:
        """``n`` more workers of the group, returned once each holds partitions."""
        workers = [self.start() for _ in range(n)]
        for w in workers:
            w.wait_until(lambda s: bool(s["assigned"]), "partitions assigned")
        return workers


ChaosWorkersFactory = Callable[..., ChaosWorkers]
"""``chaos_workers(model_dir, topics, group, *args, env=None)`` (the fixture)."""


# --------------------------------------------------------------------------- waiting
def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on ``topic`` (partitions without a commit left out)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="chaos-offsets")
    try:
        got = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in got.items() if tp.topic == topic}


def wait_consumed(
    bootstrap: str,
    group: str,
    topics: StreamTopics,
    *,
    timeout: float,
    workers: Callable[[], Sequence[WorkerHandle]],
) -> float:
    """Wait until the group committed the end of every tokens partition; seconds waited.

    Workers ack a micro-batch only once its states are durable, so committed == end means
    every token is in a checkpoint. Fails if every worker died or time runs out.
    """
    started = time.monotonic()
    end = end_offsets(bootstrap, topics.tokens, topics.partitions)
    while time.monotonic() - started < timeout:
        done = committed_offsets(bootstrap, group, topics.tokens)
        if all(done.get(p, -1) >= off for p, off in end.items()):
            return time.monotonic() - started
        if not any(w.alive() for w in workers()):
            logs = "\n---\n".join(w.log_tail() for w in workers())
            pytest.fail(f"every worker died before consuming the tokens:\n{logs}")
        time.sleep(0.5)
    done = committed_offsets(bootstrap, group, topics.tokens)
    logs = "\n---\n".join(w.log_tail(20) for w in workers())
    pytest.fail(f"group {group} committed {done}, not the end {end}, in {timeout:.0f}s:\n{logs}")


# --------------------------------------------------------------------------- reading back
def _read_all(
    bootstrap: str, topic: str, partitions: int, isolation: str = "read_committed"
) -> list[Any]:
    """Every record of ``topic`` up to its current end (group-less, nothing committed).

    ``read_committed`` (default): what a transactional reader sees (aborted writes of killed
    or fenced workers left out); the end is then the last stable offset.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        last_new = time.monotonic()
        while any(consumer.position(tp) < end[tp] for tp in tps):
            polled = consumer.poll(timeout_ms=500, max_records=50_000)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                last_new = time.monotonic()
            elif time.monotonic() - last_new > 30:
                raise TimeoutError(f"reading {topic} stalled before its end {end}")
        return records
    finally:
        consumer.close()


@dataclass
class KeyLog:
    """One key's tokens in log order, with their ``partition:offset`` ids."""

    partition: int
    offsets: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


def read_log(bootstrap: str, topics: StreamTopics) -> dict[str, KeyLog]:
    """The tokens topic, per key (a key's tokens share a partition: offsets order them)."""
    logs: dict[str, KeyLog] = {}
    for rec in sorted(
        _read_all(bootstrap, topics.tokens, topics.partitions),
        key=lambda r: (r.partition, r.offset),
    ):
        key = rec.key.decode()
        log = logs.setdefault(key, KeyLog(rec.partition))
        assert log.partition == rec.partition, f"key {key} on two partitions"
        log.offsets.append(rec.offset)
        log.tokens.append(orjson.loads(rec.value)["token"])
    return logs


def read_states(bootstrap: str, topics: StreamTopics) -> dict[str, StoredState]:
    """Every key's final state as a restore reads it (highest applied offset per key)."""

    async def read() -> dict[str, StoredState]:
        states: dict[str, StoredState] = {}
        for p in range(topics.partitions):
            states.update(await restore_partition(bootstrap, state_topic(topics.tokens), p))
        return states

    return asyncio.run(read())


def read_predictions_raw(
    bootstrap: str, topics: StreamTopics, isolation: str = "read_committed"
) -> list[dict[str, Any]]:
    """Every copy of every prediction (duplicates included: at-least-once)."""
    return [
        decode_prediction(r.value)
        for r in _read_all(bootstrap, topics.predictions, topics.partitions, isolation)
    ]


def read_states_last_written(bootstrap: str, topics: StreamTopics) -> dict[str, StoredState]:
    """Every key's state as log compaction would keep it: the LAST committed record per key in
    log order (a tombstone deletes), not the highest applied offset."""
    states: dict[str, StoredState] = {}
    for rec in _read_all(bootstrap, state_topic(topics.tokens), topics.partitions):
        key = rec.key.decode()
        if rec.value is None:
            states.pop(key, None)
        else:
            states[key] = decode_state(rec.value)
    return states


def count_records(bootstrap: str, topic: str, partitions: int) -> int:
    """How many records (tombstones included) ``topic`` holds now, read_uncommitted."""
    return len(_read_all(bootstrap, topic, partitions, "read_uncommitted"))


def compact_fast(bootstrap: str, topic: str) -> None:
    """Make the broker compact ``topic`` within seconds: segments rolled every 200 ms (and at
    1 MiB, Kafka 4's smallest), any dirty ratio worth cleaning, tombstones kept only 1 s."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="chaos-compact")
    try:
        result = admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    topic,
                    configs={
                        "segment.ms": "200",
                        "segment.bytes": str(1 << 20),
                        "min.cleanable.dirty.ratio": "0.001",
                        "min.compaction.lag.ms": "0",
                        "delete.retention.ms": "1000",
                        "cleanup.policy": "compact",
                    },
                )
            ]
        )
        assert "Error" not in str(result), f"the broker refused the topic configs: {result}"
    finally:
        admin.close()


def state_history(bootstrap: str, topics: StreamTopics, key: str, log: KeyLog) -> str:
    """Every checkpoint record of ``key`` (write time, offset, pos), to explain a failure."""
    lines = [f"state records of {key} (write time, applied offset, pos, expected pos):"]
    index = {off: i + 1 for i, off in enumerate(log.offsets)}
    for rec in _read_all(bootstrap, state_topic(topics.tokens), topics.partitions):
        if rec.key is not None and rec.key.decode() == key and rec.value is not None:
            st = decode_state(rec.value)
            when = time.strftime("%H:%M:%S", time.localtime(rec.timestamp / 1000))
            lines.append(
                f"  {when}.{rec.timestamp % 1000:03d} {st.offset} pos {st.pos} "
                f"(want {index.get(st.offset)})"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the check
@dataclass
class Verdict:
    """What the exactness check measured."""

    keys: int
    tokens: int
    predictions: int
    distinct: int
    max_state_diff: float
    max_prob_diff: float
    tie_swaps: int

    @property
    def duplicates(self) -> int:
        return self.predictions - self.distinct

    def summary(self) -> str:
        return (
            f"{self.keys} keys, {self.tokens} tokens: states max |diff| "
            f"{self.max_state_diff:.2e}; {self.predictions} predictions, {self.distinct} "
            f"distinct, {self.duplicates} duplicates, probs max |diff| "
            f"{self.max_prob_diff:.2e}, {self.tie_swaps} near-tie swaps"
        )

    def record(self, record_property: Callable[[str, object], None]) -> None:
        for name in ("keys", "tokens", "predictions", "duplicates", "max_state_diff"):
            record_property(name, getattr(self, name))


@dataclass
class Offline:
    """The offline full pass of every key: final state and top-5 after each token."""

    h: dict[str, torch.Tensor]
    c: dict[str, torch.Tensor | None]
    top_p: dict[str, torch.Tensor]
    top_i: dict[str, torch.Tensor]


@torch.inference_mode()
def offline_pass(model_dir: Path, logs: dict[str, KeyLog], *, batch: int = 4096) -> Offline:
    """``model(tokens)`` per key (keys of one length batched together): h_n, (c_n), top-5."""
    model, _ = load_checkpoint(model_dir)
    vocab = Vocab.from_tokens(ALPHABET, "char")
    by_len: dict[int, list[str]] = defaultdict(list)
    for key, log in logs.items():
        by_len[len(log.tokens)].append(key)
    out = Offline({}, {}, {}, {})
    for keys_all in by_len.values():
        for start in range(0, len(keys_all), batch):
            keys = keys_all[start : start + batch]
            ids = torch.tensor([[vocab.stoi[t] for t in logs[k].tokens] for k in keys])
            logits, state = model(ids)
            h, c = state if isinstance(state, tuple) else (state, None)
            top = torch.softmax(logits, dim=-1).topk(5, dim=-1)
            for b, key in enumerate(keys):
                out.h[key] = h[:, b]
                out.c[key] = c[:, b] if c is not None else None
                out.top_p[key] = top.values[b]
                out.top_i[key] = top.indices[b]
    return out


def verify_exact(
    bootstrap: str,
    topics: StreamTopics,
    model_dir: Path,
    *,
    predictions: bool = True,
    exactly_once: bool = True,
    last_written: bool = False,
) -> Verdict:
    """The contract, checked from the broker's topics (see the module docstring).

    ``exactly_once``: a read_committed reader must see every prediction exactly once.
    ``last_written``: take each key's state as compaction keeps it (the last record written),
    not as a restore picks it (the highest applied offset).
    """
    logs = read_log(bootstrap, topics)
    states = (
        read_states_last_written(bootstrap, topics)
        if last_written
        else read_states(bootstrap, topics)
    )
    offline = offline_pass(model_dir, logs)
    n_tokens = sum(len(log.tokens) for log in logs.values())
    assert set(states) == set(logs), (
        f"{len(set(logs) - set(states))} keys without a state, "
        f"{len(set(states) - set(logs))} states without tokens"
    )
    worst = 0.0
    wrong: list[str] = []
    for key, log in logs.items():
        st = states[key]
        want = (log.partition, log.offsets[-1], len(log.tokens), 0)
        got = (st.partition, st.offset, st.pos, st.seq)
        if got != want:
            pytest.fail(
                f"{key}: (partition, offset, pos, seq) of its state {got} != {want}\n"
                + state_history(bootstrap, topics, key, log)
            )
        diff = float((st.h.float() - offline.h[key]).abs().max())
        c_want = offline.c[key]
        if c_want is not None:
            assert st.c is not None, key
            diff = max(diff, float((st.c.float() - c_want).abs().max()))
        worst = max(worst, diff)
        if diff > TOL:
            wrong.append(f"{key} ({diff:.2e})")
    assert not wrong, f"{len(wrong)} keys' states differ from offline: {wrong[:10]}"
    if not predictions:
        return Verdict(len(logs), n_tokens, 0, 0, worst, 0.0, 0)
    verdict = _check_predictions(bootstrap, topics, model_dir, logs, offline, n_tokens, worst)
    if exactly_once:
        assert verdict.duplicates == 0, (
            f"a read_committed reader saw {verdict.duplicates} duplicate predictions under "
            "exactly-once"
        )
    return verdict


def _check_predictions(
    bootstrap: str,
    topics: StreamTopics,
    model_dir: Path,
    logs: dict[str, KeyLog],
    offline: Offline,
    n_tokens: int,
    state_diff: float,
) -> Verdict:
    _, manifest = load_checkpoint(model_dir)
    preds = read_predictions_raw(bootstrap, topics)
    where: dict[str, tuple[str, int]] = {}
    for key, log in logs.items():
        for i, off in enumerate(log.offsets):
            where[f"{log.partition}:{off}"] = (key, i)
    itos = Vocab.from_tokens(ALPHABET, "char").itos
    seen: set[str] = set()
    got_p, want_p = [], []
    swaps = 0
    for pred in preds:
        assert pred["type"] == "next", pred
        assert pred["id"] in where, f"prediction for an unknown token {pred['id']}"
        key, i = where[pred["id"]]
        assert (pred["key"], pred["pos"], pred["seq"]) == (key, i, 0), (pred, key, i)
        assert pred["model_version"] == manifest.version
        seen.add(pred["id"])
        got_p.append(pred["next"]["probs"])
        want_p.append(offline.top_p[key][i])
        want_tokens = [itos[t] for t in offline.top_i[key][i].tolist()]
        if pred["next"]["tokens"] != want_tokens:
            swaps += 1
            want = {"tokens": want_tokens, "probs": offline.top_p[key][i].tolist()}
            assert_same_top_k(pred["next"], want, f"{key}@{i}")
    missing = set(where) - seen
    assert not missing, f"{len(missing)} tokens have no prediction, e.g. {sorted(missing)[:5]}"
    prob_diff = float((torch.tensor(got_p) - torch.stack(want_p)).abs().max()) if got_p else 0.0
    assert prob_diff <= TOL, f"a prediction's probabilities differ by {prob_diff:.2e}"
    return Verdict(len(logs), n_tokens, len(preds), len(seen), state_diff, prob_diff, swaps)
