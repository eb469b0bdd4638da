"""The in-process replay: the same predictions as `score`, timing, dead letters, eviction.

Models have random weights (agreement needs no trained model) and tiny sizes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from stream_harness import TOL, assert_same_top_k, make_model

from stream_rnn.engine.engine import Engine
from stream_rnn.model.network import RecurrentModel
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import Manifest, load_checkpoint, save_checkpoint
from stream_rnn.replay.analysis import analyse
from stream_rnn.replay.inproc import InprocOptions, InprocSwap, run_inproc
from stream_rnn.replay.schedule import Timing, build_schedule

TS0 = 1_700_000_000.0


def _loader(model: RecurrentModel, manifest: Manifest) -> Any:
    return lambda version: (model, manifest) if version == manifest.version else None


@pytest.mark.parametrize("task", ["next-token", "classify"])
def test_inproc_replay_equals_offline_scoring(task: str, tmp_path: Path) -> None:
    model_dir, data, records = make_model(tmp_path, task, 30)
    model, manifest = load_checkpoint(model_dir)
    schedule = build_schedule(data, level="char", timing=Timing(fast=True), seed=5)
    # a pool of 6 keys for 30 interleaved keys: every step evicts and restores some
    engine = Engine(model, manifest, capacity=6)
    result = run_inproc(schedule, engine, options=InprocOptions(fast=True, max_batch=40))
    analysis = analyse(schedule, result, task=task, load=_loader(model, manifest))

    offline = list(score_records(model, manifest, records))
    assert [line["key"] for line in analysis.lines] == [line["key"] for line in offline]
    for got, want in zip(analysis.lines, offline, strict=True):
        assert got["model_version"] == want["model_version"] == manifest.version
        if task == "classify":
            assert got["label"] == want["label"]
            assert list(got["probs"].values()) == pytest.approx(
                list(want["probs"].values()), abs=TOL
            )
        else:
            assert len(got["next"]) == len(want["next"])
            for a, b in zip(got["next"], want["next"], strict=True):
                assert_same_top_k(a, b, want["key"])
    assert analysis.passed, [(c.name, c.detail) for c in analysis.checks]
    assert analysis.agreement.checked == (
        len(records) if task == "classify" else sum(len(r.items("char")) for r in records)
    )
    assert result.pool is not None and result.pool["evictions"] > 0 and result.pool["restores"] > 0
    assert result.pool["deletions"] == len(records)  # every sequence ended
    assert len(analysis.latencies) == analysis.counts["predictions"] > 0
    assert 0 <= min(analysis.latencies) <= max(analysis.latencies) < 30


def test_micro_batches_follow_the_schedule_and_latency_counts_from_it(tmp_path: Path) -> None:
    model_dir, _, _ = make_model(tmp_path, "next-token", 3)
    model, manifest = load_checkpoint(model_dir)
    rows = [("a", 0.0), ("b", 0.0), ("a", 1.0), ("b", 1.0), ("a", 5.0)]
    log = tmp_path / "e.jsonl"
    log.write_text(
        "".join(
            json.dumps({"key": k, "v": 1, "type": "token", "token": "a", "ts": TS0 + t}) + "\n"
            for k, t in rows
        )
    )
    schedule = build_schedule(log, level="char", timing=Timing(speed=2.0))
    now = [0.0]  # a fake clock: sleeping moves it, processing takes 0.25 s per batch

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def monotonic() -> float:
        return now[0]

    engine = Engine(model, manifest)
    real_process = engine.process

    def slow_process(events: Any, served: Any = None) -> Any:
        now[0] += 0.25
        return real_process(events, served)

    engine.process = slow_process  # type: ignore[method-assign]
    result = run_inproc(schedule, engine, monotonic=monotonic, sleep=sleep)
    assert result.sent_at == pytest.approx([0.0, 0.0, 0.5, 0.5, 2.5])  # the schedule, / speed
    assert [n for _, n in result.batches] == [2, 2, 1]  # whatever was due, as one batch
    latency = sorted((o.index, o.at - result.sent_at[o.index]) for o in result.outputs)
    assert [x for _, x in latency] == pytest.approx([0.25] * 5)


def test_idle_keys_are_evicted_on_replay_time_and_restored_exactly(tmp_path: Path) -> None:
    model_dir, _, _ = make_model(tmp_path, "next-token", 3)
    model, manifest = load_checkpoint(model_dir)
    rows = [("a", 0.0), ("b", 0.5), ("a", 1.0), ("b", 2.0), ("a", 30.0), ("b", 31.0), ("a", 31.5)]
    log = tmp_path / "e.jsonl"
    log.write_text(
        "".join(
            json.dumps({"key": k, "v": 1, "type": "token", "token": "ab"[i % 2], "ts": TS0 + t})
            + "\n"
            for i, (k, t) in enumerate(rows)
        )
    )
    # --max: no waiting, yet the pool sees the schedule's 28 s of silence
    schedule = build_schedule(log, level="char", timing=Timing(fast=True))
    engine = Engine(model, manifest, ttl_s=5.0)
    result = run_inproc(
        schedule, engine, options=InprocOptions(fast=True, max_batch=2, expire_interval_s=1.0)
    )
    assert result.pool is not None
    assert result.pool["expirations"] == 2 and result.pool["restores"] == 2
    analysis = analyse(schedule, result, task="next-token", load=_loader(model, manifest))
    assert analysis.passed and analysis.agreement.checked == len(rows)


def test_malformed_messages_come_back_as_dead_letters_counted_by_reason(tmp_path: Path) -> None:
    model_dir, _, _ = make_model(tmp_path, "next-token", 3)
    model, manifest = load_checkpoint(model_dir)
    bad = [
        ("k1", '{"v":1,"type":"token","token":"a"', "not_json"),
        ("k2", '{"v":1,"type":"token","token":true}', "wrong_type"),
        (None, '{"v":1,"type":"token","token":"a"}', "missing_key"),
        ("k3", '{"v":1,"type":"end"}', "unknown_key"),
        ("k4", '{"v":1,"type":"token","token":123456789}', "token_out_of_range"),
        ("k5", '{"v":1,"type":"token","token":"a"}', None),  # valid after all: a prediction
    ]
    lines = [json.dumps({"key": "a", "v": 1, "type": "token", "token": "a"})]
    for key, raw, reason in bad:
        lines.append(json.dumps({"key": key, "raw": raw, "expect": reason}))
    log = tmp_path / "e.jsonl"
    log.write_text("\n".join(lines) + "\n")
    schedule = build_schedule(log, level="char", timing=Timing(fast=True))
    result = run_inproc(schedule, Engine(model, manifest), options=InprocOptions(fast=True))
    analysis = analyse(schedule, result, task="next-token", load=_loader(model, manifest))
    assert dict(analysis.dead_letters) == {
        "not_json": 1, "wrong_type": 1, "missing_key": 1, "unknown_key": 1,
        "token_out_of_range": 1,
    }  # fmt: skip
    assert analysis.dead_letters == analysis.expected_dead_letters
    assert analysis.counts["predictions"] == 2 and analysis.passed
    # the dead letters carry the original bytes
    letters = {o.body["reason"]: o.body for o in result.outputs if o.kind == "dead_letter"}
    assert letters["not_json"]["value"] == bad[0][1].encode()


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_a_swap_mid_replay_is_checked_under_the_policy_that_reproduces_it(
    policy: str, tmp_path: Path
) -> None:
    model_dir, data, _ = make_model(tmp_path, "next-token", 20)
    first, first_manifest = load_checkpoint(model_dir)
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_checkpoint(tmp_path / "v2", second, vocab=first_manifest.vocab)
    second, second_manifest = load_checkpoint(tmp_path / "v2")
    schedule = build_schedule(data, level="char", timing=Timing(fast=True), seed=2)
    engine = Engine(first, first_manifest)
    # the new version arrives before the 6th micro-batch
    swap = InprocSwap(250, second, second_manifest, policy)  # type: ignore[arg-type]
    result = run_inproc(
        schedule, engine, options=InprocOptions(fast=True, max_batch=50), swaps=[swap]
    )
    models = {
        m.version: (net, m) for net, m in ((first, first_manifest), (second, second_manifest))
    }
    analysis = analyse(schedule, result, task="next-token", load=models.get)
    agreement = analysis.agreement
    assert [v for v, _, _ in analysis.versions] == [first_manifest.version, second_manifest.version]
    assert agreement.span_policies == {policy: agreement.span_policies[policy]} != {}
    assert agreement.mismatched == 0 and not agreement.not_checked and analysis.passed
    assert analysis.markers == [(analysis.versions[1][1], f"model {second_manifest.version[:14]}")]
