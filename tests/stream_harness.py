"""Helpers of the end-to-end stream tests: tiny models, worker processes, result comparison.

Workers run as real processes (``python -m stream_rnn worker``) against the session broker;
`WorkerProcess` (a `stream_rnn.ops.processes.WorkerHandle`) polls their status endpoint and
stops them (SIGTERM, then SIGKILL). The fixtures ``stream_topics`` and ``worker_factory`` in
``kafka_fixtures.py`` wrap these with cleanup.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch

from stream_rnn.model import ModelConfig, RecurrentModel
from stream_rnn.ops.processes import (
    KILL_TIMEOUT_S,
    POLL_S,
    ProcessExitedError,
    ProcessWaitTimeout,
    WorkerHandle,
)
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import load_checkpoint, save_checkpoint
from stream_rnn.train.data import Record, write_records
from stream_rnn.train.synthetic import generate_split
from stream_rnn.train.vocab import LabelSet, Vocab

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
WORKER_READY_S = 90.0
WORKER_STOP_S = 30.0


@dataclass(frozen=True)
class StreamTopics:
    """Unique topic names of one test (the worker creates them with ``--partitions``)."""

    tokens: str
    predictions: str
    dead_letters: str
    partitions: int

    def worker_args(self) -> list[str]:
        return [
            "--topic", self.tokens, "--predictions-topic", self.predictions,
            "--dead-letter-topic", self.dead_letters, "--partitions", str(self.partitions),
        ]  # fmt: skip


def make_model(out: Path, task: str, n: int, *, seed: int = 1) -> tuple[Path, Path, list[Record]]:
    """A random-weight GRU checkpoint for synthetic ``task`` data and that data (JSONL).

    Records: ``n`` sequences plus the first three again (a key's second sequence).
    """
    split = generate_split(task, 0, 0, n, seed=seed)  # type: ignore[arg-type]
    records = split.test + split.test[:3]
    vocab = Vocab.build([r.items("char") for r in records], "char")
    labels = LabelSet.build(str(r.label) for r in records).labels if task == "classify" else None
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task=task,
        cell="gru",
        vocab_size=len(vocab),
        embed_dim=8,
        hidden_size=16,
        num_labels=len(labels) if labels else 0,
    )
    model_dir = out / f"model-{task}"
    save_checkpoint(
        model_dir,
        RecurrentModel(cfg).eval(),
        vocab=vocab.to_dict(),
        labels=list(labels) if labels else None,
    )
    data = out / f"data-{task}.jsonl"
    write_records(data, records)
    return model_dir, data, records


def tiny_checkpoint(out: Path, seed: int, vocab: Vocab | None = None) -> Path:
    """A small untrained next-token GRU checkpoint in ``out`` (distinct weights per seed)."""
    vocab = vocab or Vocab.build(["abcdefgh"], "char")
    torch.manual_seed(seed)
    cfg = ModelConfig(
        task="next-token", cell="gru", vocab_size=len(vocab), embed_dim=4, hidden_size=8
    )
    save_checkpoint(out, RecurrentModel(cfg).eval(), vocab=vocab.to_dict())
    return out


def expected_count(task: str, records: Sequence[Record]) -> int:
    """Distinct predictions a worker emits for ``records`` (each sequence ended)."""
    if task == "classify":
        return len(records)  # one label per end
    return sum(len(r.items("char")) for r in records) + len(records)  # per token + end


def assert_matches_offline(
    lines: list[dict[str, Any]], model_dir: Path, records: Sequence[Record]
) -> None:
    """Collected lines (sorted by key, seq) equal `score_records` (labels/tokens, probs 1e-5)."""
    model, manifest = load_checkpoint(model_dir)
    offline = list(score_records(model, manifest, records))
    by_key: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_key.setdefault(line["key"], []).append(line)
    assert len(lines) == len(offline), (len(lines), len(offline))
    seen: dict[str, int] = {}
    for want in offline:
        n = seen[want["key"]] = seen.get(want["key"], -1) + 1
        got = by_key[want["key"]][n]
        assert got["model_version"] == want["model_version"] == manifest.version
        if "label" in want:
            assert got["label"] == want["label"], want["key"]
            assert list(got["probs"]) == list(want["probs"])
            assert list(got["probs"].values()) == pytest.approx(
                list(want["probs"].values()), abs=TOL
            )
        else:
            assert len(got["next"]) == len(want["next"]), want["key"]
            for a, b in zip(got["next"], want["next"], strict=True):
                assert_same_top_k(a, b, want["key"])


def assert_same_top_k(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    """Same top-k candidates and probabilities (1e-5), allowing only ties to swap places.

    Random-weight models make near-ties common (two candidates within 1e-8), and 1e-8 of
    float noise may then order them differently, or push one across the k-th place.
    """
    assert a["probs"] == pytest.approx(b["probs"], abs=TOL), where
    if a["tokens"] == b["tokens"]:
        return
    for x, y in ((a, b), (b, a)):
        px = dict(zip(x["tokens"], x["probs"], strict=True))
        py = dict(zip(y["tokens"], y["probs"], strict=True))
        for token, prob in px.items():
            if token in py:
                assert prob == pytest.approx(py[token], abs=TOL), (where, x, y)
            else:  # missing from the other top-k: only if it ties with its k-th place
                assert prob <= min(py.values()) + TOL, (where, x, y)


def count_types(kinds: set[str], total: int) -> Callable[[list[dict[str, Any]]], bool]:
    """``until`` predicate for `collect`: ``total`` predictions of the given types arrived."""
    return lambda preds: sum(p["type"] in kinds for p in preds) >= total


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run ``python -m stream_rnn ARGS`` to completion; its stderr+stdout, or fail with them."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_rnn", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"stream-rnn {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}"
    return proc.stderr + proc.stdout


class WorkerProcess(WorkerHandle):
    """One ``stream-rnn worker`` subprocess (cwd: the repository) whose waits fail the test.

    ``args`` are the worker's flags; ``--web-port port`` is added. See `WorkerHandle`.
    """

    def __init__(self, args: list[str], port: int, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(args, port, log_path, env=env, cwd=REPO)

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = WORKER_READY_S,
        *,
        poll_s: float = POLL_S,
    ) -> dict[str, Any]:
        """Poll the status until ``predicate`` holds; fail (with the log) if the worker dies."""
        try:
            return super().wait_until(predicate, what, timeout, poll_s=poll_s)
        except (ProcessExitedError, ProcessWaitTimeout) as err:
            message = str(err)
        pytest.fail(message)

    def stop(self, timeout: float = WORKER_STOP_S, *, kill_timeout: float = KILL_TIMEOUT_S) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit code."""
        return super().stop(timeout, kill_timeout=kill_timeout)


class StreamTopicsFactory(Protocol):
    """Unique names for a test's tokens, predictions and dead-letter topics (deleted after)."""

    def __call__(self, *, partitions: int = 4) -> StreamTopics: ...


class WorkerFactory(Protocol):
    """Starts ``stream-rnn worker --model MODEL --bootstrap ... ARGS`` as a subprocess.

    ``env`` adds to (and overrides) the fixture's environment, e.g. ``STREAM_RNN_*`` settings.
    """

    def __call__(
        self,
        model_dir: Path,
        *args: str,
        group: str | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess: ...
