"""Streaming equals offline across hot swaps between models that differ.

Hypothesis drives the worker's Kafka-free path (`Adapter.process` over wire bytes, the engine
behind it) through random swaps between models that differ in vocabulary (size, order, level),
architecture, cell, task and labels, under every swap policy, with swap points in the middle of
sequences, evictions to the store, ``end`` events and both unknown-token policies. Every output
must equal the offline full pass of the version it names, with the policy applied at the swap
point, computed here independently of the engine:

* ``keep`` (only between identical architectures and vocabularies): the new model continues
  from the old model's final state;
* ``reset``: the new model from zeros; the key's token history is cleared;
* ``rewarm``: the new model from zeros over the key's last ``history`` tokens, each mapped to
  the new vocabulary through its string (a token the old vocabulary did not know was ``<unk>``
  there, and stays ``<unk>``), then on.

The first version of this test failed on the adapter that kept its vocabulary across a swap
(tokens encoded with the old vocabulary, read by the new model as other tokens).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_rnn.engine.engine import Engine
from stream_rnn.engine.exceptions import EngineError
from stream_rnn.engine.pool import StatePool
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest, load_checkpoint, save_checkpoint
from stream_rnn.replay.inproc import InprocOptions, InprocSwap, run_inproc
from stream_rnn.replay.schedule import Timing, build_schedule
from stream_rnn.stream.adapter import Adapter, RawRecord
from stream_rnn.train.vocab import Vocab

ALPHABET = list("abcdefghij")  # every model knows a subset; "z" is known to none
TOL = 1e-5


@dataclass(frozen=True)
class Spec:
    task: str
    cell: str
    layers: int
    hidden: int
    embed: int
    level: str
    tokens: tuple[str, ...]
    labels: tuple[str, ...] | None
    seed: int


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    task = draw(st.sampled_from(["next-token", "tag", "classify"]))
    size = draw(st.integers(3, len(ALPHABET)))
    tokens = tuple(draw(st.permutations(ALPHABET))[:size])
    labels = None
    if task != "next-token":
        labels = tuple(draw(st.permutations(["x", "y", "z", "w"]))[: draw(st.integers(2, 4))])
    return Spec(
        task=task,
        cell=draw(st.sampled_from(["rnn_tanh", "lstm", "gru"])),
        layers=draw(st.integers(1, 2)),
        hidden=draw(st.sampled_from([4, 6])),
        embed=draw(st.sampled_from([3, 5])),
        level=draw(st.sampled_from(["char", "token"])),
        tokens=tokens,
        labels=labels,
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def successor(draw: st.DrawFn, prev: Spec) -> Spec:
    """The next version: new weights only (keep applies), the same architecture with another
    vocabulary order (keep is refused), or another model altogether."""
    kind = draw(st.sampled_from(["weights", "reordered", "other"]))
    seed = prev.seed + 1 + draw(st.integers(0, 2**16))  # other weights: another version
    if kind == "weights":
        return Spec(**{**prev.__dict__, "seed": seed})
    if kind == "reordered":
        tokens = tuple(draw(st.permutations(list(prev.tokens))))
        return Spec(**{**prev.__dict__, "tokens": tokens, "seed": seed})
    return Spec(**{**draw(specs()).__dict__, "seed": seed})


def build(spec: Spec, where: Path) -> tuple[RecurrentModel, Manifest]:
    vocab = Vocab.from_tokens(list(spec.tokens), spec.level)  # type: ignore[arg-type]
    cfg = ModelConfig(
        task=spec.task,  # type: ignore[arg-type]
        cell=spec.cell,  # type: ignore[arg-type]
        vocab_size=len(vocab),
        embed_dim=spec.embed,
        hidden_size=spec.hidden,
        num_layers=spec.layers,
        num_labels=len(spec.labels or ()),
    )
    torch.manual_seed(spec.seed)
    model = RecurrentModel(cfg)
    with torch.no_grad():  # larger weights than the default init: outputs differ visibly
        for p in model.parameters():
            p.mul_(3.0)
    labels = list(spec.labels) if spec.labels else None
    save_checkpoint(where, model, vocab=vocab.to_dict(), labels=labels)
    return load_checkpoint(where)


# ------------------------------------------------------------------------------ the oracle
@dataclass
class Segment:
    """Tokens a key's state went through under one model since its last start point."""

    model: RecurrentModel
    start: Any  # initial state (None: zeros)
    prefix: list[int] = field(default_factory=list)  # rewarm: the mapped history
    ids: list[int] = field(default_factory=list)

    def run(self) -> tuple[torch.Tensor, Any]:
        """Offline full pass: (probabilities per token of ``ids``, final state)."""
        seq = self.prefix + self.ids
        if not seq:
            return torch.empty(0), self.start
        with torch.no_grad():
            logits, state = self.model(torch.tensor([seq]), self.start)
        return torch.softmax(logits[0, len(self.prefix) :], -1), state

    def final_logits(self) -> torch.Tensor:
        _, state = self.run()
        if state is None:
            state = self.model.init_state(1)
        top = (state[0] if isinstance(state, tuple) else state)[-1]
        with torch.no_grad():
            return self.model.decoder(top)[0]


@dataclass
class KeyOracle:
    segment: Segment
    history: list[int] = field(default_factory=list)  # ids in the current vocabulary
    pos: int = 0


@dataclass
class Expected:
    """What one prediction must say: its version and per-token (segment, index) references,
    or an end's segment."""

    version: str
    kind: str
    refs: list[tuple[Segment, int]] = field(default_factory=list)
    pos: int = 0
    end_segment: Segment | None = None
    n_tokens: int = 0


class Oracle:
    def __init__(self, model: RecurrentModel, manifest: Manifest, history: int) -> None:
        self.model, self.manifest = model, manifest
        self.vocab = Vocab.from_dict(manifest.vocab)
        self.history = history
        self.keys: dict[str, KeyOracle] = {}

    def tokens(self, key: str, tokens: list[str], unknown: str) -> list[tuple[Segment, int]] | None:
        stoi = self.vocab.stoi
        if unknown == "reject" and any(t not in stoi for t in tokens):
            return None  # dead-lettered: the state does not change
        k = self.keys.setdefault(key, KeyOracle(Segment(self.model, None)))
        refs = []
        for t in tokens:
            tid = stoi.get(t, self.vocab.unk_id)
            k.segment.ids.append(tid)
            if self.history:
                k.history = (k.history + [tid])[-self.history :]
            refs.append((k.segment, len(k.segment.ids) - 1))
            k.pos += 1
        return refs

    def end(self, key: str) -> tuple[Segment, int] | None:
        k = self.keys.pop(key, None)
        if k is None or k.pos == 0:
            return None
        return k.segment, k.pos

    def swap(self, model: RecurrentModel, manifest: Manifest, policy: str) -> None:
        new_vocab = Vocab.from_dict(manifest.vocab)
        for k in self.keys.values():
            if policy == "keep":
                _, state = k.segment.run()
                k.segment = Segment(model, state)
            elif policy == "reset":
                k.segment, k.history = Segment(model, None), []
            else:  # rewarm: the history through its strings into the new vocabulary
                strings = [self.vocab.itos[i] for i in k.history]
                k.history = [new_vocab.stoi.get(s, new_vocab.unk_id) for s in strings]
                k.segment = Segment(model, None, prefix=list(k.history))
        self.model, self.manifest, self.vocab = model, manifest, new_vocab


def expected_policy(requested: str, old: Spec, new: Spec, history: int) -> str:
    same = (
        old.tokens == new.tokens
        and old.level == new.level
        and (old.task, old.cell, old.layers, old.hidden, old.embed, old.labels)
        == (new.task, new.cell, new.layers, new.hidden, new.embed, new.labels)
    )
    if requested == "keep" and not same:
        requested = "rewarm"
    if requested == "rewarm" and not history:
        return "reset"
    return requested


# ------------------------------------------------------------------------------ checking
def check(pred: dict[str, Any], exp: Expected, labels_of: dict[str, list[str]]) -> None:
    assert pred["model_version"] == exp.version, (pred, exp.version)
    kind = pred["type"]
    if kind == "end":
        assert pred["n_tokens"] == exp.n_tokens
        return
    if kind == "label":
        assert exp.end_segment is not None
        probs = torch.softmax(exp.end_segment.final_logits(), -1).tolist()
        want = dict(zip(labels_of[exp.version], probs, strict=True))
        assert pred["probs"] == pytest.approx(want, abs=TOL)
        return
    assert pred["pos"] == exp.pos
    offline = [seg.run()[0][i] for seg, i in exp.refs]
    chunk = kind.endswith("_chunk")
    base = kind.removesuffix("_chunk")
    rows = range(len(offline))
    if base == "next":
        tops = pred["next"] if chunk else [pred["next"]]
        itos = labels_of[exp.version]
        for row, top in zip(rows, tops, strict=True):
            want = offline[row]
            got = [float(want[itos.index(t)]) for t in top["tokens"]]
            assert top["probs"] == pytest.approx(got, abs=TOL)
            best = torch.sort(want, descending=True).values[: len(got)].tolist()
            assert top["probs"] == pytest.approx(best, abs=TOL)
    elif base == "tag":
        tags = pred["tag"] if chunk else [pred["tag"]]
        probs = pred["prob"] if chunk else [pred["prob"]]
        names = labels_of[exp.version]
        for row, tag, p in zip(rows, tags, probs, strict=True):
            assert p == pytest.approx(float(offline[row].max()), abs=TOL)
            assert float(offline[row][names.index(tag)]) == pytest.approx(p, abs=TOL)
    else:  # estimate
        dists = pred["probs"] if chunk else [pred["probs"]]
        names = labels_of[exp.version]
        for row, dist in zip(rows, dists, strict=True):
            want = dict(zip(names, offline[row].tolist(), strict=True))
            assert dist == pytest.approx(want, abs=TOL)


def _message(tokens: list[str]) -> bytes:
    if len(tokens) == 1:
        return json.dumps({"v": 1, "type": "token", "token": tokens[0]}).encode()
    return json.dumps({"v": 1, "type": "tokens", "tokens": tokens}).encode()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_every_output_equals_the_offline_pass_of_the_version_it_names(data: st.DataObject) -> None:
    chain = [data.draw(specs(), label="v1")]
    for i in range(data.draw(st.integers(1, 3), label="swaps")):
        chain.append(data.draw(successor(chain[-1]), label=f"v{i + 2}"))
    history = data.draw(st.sampled_from([0, 3]), label="history")
    capacity = data.draw(st.sampled_from([2, 64]), label="capacity")
    unknown = data.draw(st.sampled_from(["unk", "reject"]), label="unknown")
    with tempfile.TemporaryDirectory() as tmp:
        versions = [build(s, Path(tmp) / f"v{i}") for i, s in enumerate(chain)]
    model, manifest = versions[0]
    pool = StatePool(model.config, capacity, history=history)
    engine = Engine(model, manifest, pool=pool, running_estimate=True, top_k=3)
    adapter = Adapter(unknown=unknown)  # type: ignore[arg-type]
    oracle = Oracle(model, manifest, history)
    labels_of = {
        m.version: list(m.labels) if m.labels else list(Vocab.from_dict(m.vocab).itos)
        for _, m in versions
    }
    # the stream: keys' messages interleaved, an end now and then, swaps between batches
    messages = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["k0", "k1", "k2", "k3", "k4"]),
                st.one_of(
                    st.lists(st.sampled_from([*ALPHABET, "z"]), min_size=1, max_size=3),
                    st.just(["<end>"]),
                ),
            ),
            min_size=4,
            max_size=40,
        ),
        label="messages",
    )
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(messages) - 1), max_size=6))))
    bounds = [0, *cuts, len(messages)]
    swap_after = sorted(
        data.draw(
            st.lists(
                st.integers(0, len(bounds) - 2),
                min_size=len(chain) - 1,
                max_size=len(chain) - 1,
            ),
            label="swap points",
        )
    )
    expected: dict[str, Expected] = {}
    served = 0
    offset = 0
    for b in range(len(bounds) - 1):
        records = []
        for key, tokens in messages[bounds[b] : bounds[b + 1]]:
            ident = f"0:{offset}"
            if tokens == ["<end>"]:
                records.append(RawRecord(key.encode(), b'{"v":1,"type":"end"}', "t", 0, offset))
                ended = oracle.end(key)
                if ended is not None:
                    kind = "label" if oracle.model.config.task == "classify" else "end"
                    expected[ident] = Expected(
                        oracle.manifest.version, kind, end_segment=ended[0], n_tokens=ended[1]
                    )
            else:
                records.append(RawRecord(key.encode(), _message(tokens), "t", 0, offset))
                before = oracle.keys[key].pos if key in oracle.keys else 0
                refs = oracle.tokens(key, tokens, unknown)
                if refs is not None:
                    expected[ident] = Expected(oracle.manifest.version, "tokens", refs, before)
            offset += 1
        out = adapter.process(records, engine)
        for _, value in out.predictions:
            pred = json.loads(value)
            exp = expected.pop(pred["id"])
            check(pred, exp, labels_of)
        while served < len(chain) - 1 and swap_after[served] == b:
            served += 1
            requested = data.draw(st.sampled_from(["keep", "reset", "rewarm"]), label="policy")
            new_model, new_manifest = versions[served]
            report = engine.swap(new_model, new_manifest, requested)  # type: ignore[arg-type]
            want = expected_policy(requested, chain[served - 1], chain[served], history)
            assert report.policy_applied == want, report.note
            oracle.swap(new_model, new_manifest, report.policy_applied)
    # everything expected was answered (predictions for tokens under tasks that emit them)
    assert all(e.kind == "tokens" and not e.refs for e in expected.values()), expected


def test_a_batch_decoded_before_a_swap_is_refused_not_stepped(tmp_path: Path) -> None:
    """Events resolved with one version's vocabulary never reach another version's model."""
    v1 = build(Spec("next-token", "gru", 1, 4, 3, "char", ("a", "b", "c"), None, 1), tmp_path / "1")
    v2 = build(Spec("next-token", "gru", 1, 4, 3, "char", ("c", "b", "a"), None, 2), tmp_path / "2")
    engine = Engine(*v1)
    stale = engine.served
    batch = Adapter().decode(
        [RawRecord(b"k", b'{"v":1,"type":"token","token":"a"}', "t", 0, 0)], stale.vocab
    )
    engine.swap(*v2, "reset")
    with pytest.raises(EngineError, match="decoded for model"):
        engine.process(batch.events, stale)
    # the tables of the new version replaced the old ones as a whole
    assert engine.vocab.itos[4:] == ("c", "b", "a") and engine.heads.itos[4:] == ["c", "b", "a"]


def test_in_process_replay_swaps_to_another_vocabulary_and_agrees_offline(tmp_path: Path) -> None:
    """The in-process replay with a publish mid-stream (another vocabulary, another cell):
    each prediction equals the offline pass of the version it names."""
    from stream_rnn.replay.analysis import analyse

    v1 = build(
        Spec("next-token", "gru", 1, 8, 5, "char", tuple("abcdefg "), None, 3), tmp_path / "1"
    )
    v2 = build(
        Spec("next-token", "lstm", 2, 6, 4, "char", tuple(" gfedcbahij"), None, 4), tmp_path / "2"
    )
    data = tmp_path / "data.jsonl"
    rows = [{"key": f"u{i}", "text": "abcdefg hij"[i % 5 :] * 3} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    schedule = build_schedule(data, level="char", timing=Timing(fast=True), seed=5)
    for policy in ("reset", "rewarm"):
        engine = Engine(*v1, history=4 if policy == "rewarm" else None)
        swap = InprocSwap(len(schedule.events) // 2, v2[0], v2[1], policy)  # type: ignore[arg-type]
        result = run_inproc(
            schedule, engine, options=InprocOptions(fast=True, max_batch=7), swaps=[swap]
        )
        assert result.versions_served == [v1[1].version, v2[1].version]
        assert [f.status for f in result.faults] == ["done"]
        models = {m.version: (net, m) for net, m in (v1, v2)}
        analysis = analyse(
            schedule,
            result,
            task="next-token",
            load=models.get,
            history=4 if policy == "rewarm" else 0,
        )
        agreement = analysis.agreement
        assert agreement.mismatched == 0 and not agreement.not_checked, agreement
        assert agreement.span_policies.get(policy), agreement.span_policies


def test_replay_cli_publishes_another_vocabulary_in_process(tmp_path: Path) -> None:
    """``stream-rnn replay --fault publish:DIR@P%`` in process: the report's agreement check
    holds every prediction to the offline pass of the version that made it."""
    import subprocess
    import sys

    build(Spec("next-token", "gru", 1, 8, 5, "char", tuple("abcde "), None, 7), tmp_path / "v1")
    build(Spec("next-token", "gru", 1, 8, 5, "char", tuple(" xedcba"), None, 8), tmp_path / "v2")
    data = tmp_path / "data.jsonl"
    rows = [{"key": f"u{i % 7}", "text": "abcde xa"[i % 4 :] * 4} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable, "-m", "stream_rnn", "replay", "--data", str(data),
            "--model", str(tmp_path / "v1"), "--max", "--history", "4",
            "--fault", f"publish:{tmp_path / 'v2'}@50%", "--report", str(report),
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (report / "report.md").read_text()
    assert "Guarantee checks: all passed" in text, text
    faults = json.loads((report / "faults.json").read_text())
    assert [f["status"] for f in faults] == ["done"] and "rewarm" in faults[0]["detail"]
