"""Streamed predictions against the offline pass of the model version that made them.

For every sequence whose predictions all name one version, the full-sequence pass of that
version (`stream_rnn.predict.offline.score_records`, what ``stream-rnn score`` writes) is
computed and each streamed prediction compared with its position: the same top-k candidates
and probabilities within ``tol`` (only near-ties may swap places), the same label and label
probabilities, the same tag, the same translation. Sequences spanning a model swap, and
versions without a model to load, are counted as not checked. For next-token models the same
pass gives the negative log-likelihood of each true next token (the stream carries only the
top-k), from which the report computes perplexity.

Example::

    offline = OfflinePass(schedule, task, load_version)
    verdict = offline.compare(per_sequence)     # Agreement(checked=..., mismatched=0, ...)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stream_rnn.engine.versions import keep_refusal
from stream_rnn.model.network import RecurrentModel
from stream_rnn.predict.format import next_token_line, tag_line
from stream_rnn.predict.offline import score_records
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.replay.schedule import Schedule, SeqInfo
from stream_rnn.train.data import Record
from stream_rnn.train.vocab import LabelSet, Vocab

TOL = 1e-5
BATCH = 64
LoadVersion = Callable[[str], "tuple[RecurrentModel, Manifest] | None"]


@dataclass
class SeqPredictions:
    """The streamed predictions of one sequence: per token position, and the closing one."""

    tokens: dict[int, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, Any] | None = None

    @property
    def count(self) -> int:
        return len(self.tokens) + (self.final is not None)

    def versions(self) -> set[str]:
        found = {p["model_version"] for p in self.tokens.values()}
        if self.final is not None:
            found.add(self.final["model_version"])
        return found


@dataclass
class Agreement:
    """How the stream agreed with the offline pass."""

    checked: int = 0
    mismatched: int = 0
    max_diff: float = 0.0
    not_checked: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    span_policies: Counter[str] = field(default_factory=Counter)  # swaps reproduced, by policy


class OfflinePass:
    """Offline lines (and next-token NLLs) per ``(version, sequence)``, computed on demand."""

    def __init__(
        self, schedule: Schedule, task: str, load: LoadVersion, top_k: int = 5, history: int = 0
    ) -> None:
        self.schedule, self.task, self.load, self.top_k = schedule, task, load, top_k
        self.history = history
        self._models: dict[str, tuple[RecurrentModel, Manifest] | None] = {}
        self.lines: dict[tuple[str, int], dict[str, Any]] = {}
        self.nll: dict[tuple[str, int], list[float]] = {}

    def model(self, version: str) -> tuple[RecurrentModel, Manifest] | None:
        if version not in self._models:
            self._models[version] = self.load(version)
        return self._models[version]

    def run(self, version: str, seqs: list[int]) -> bool:
        """Compute the offline pass of ``version`` over sequences ``seqs``; False: no model."""
        loaded = self.model(version)
        if loaded is None:
            return False
        model, manifest = loaded
        todo = [s for s in seqs if (version, s) not in self.lines]
        infos = [self.schedule.sequences[s] for s in todo]
        records = [Record(info.key, tokens=list(info.items)) for info in infos]
        for s, line in zip(
            todo, score_records(model, manifest, records, top_k=self.top_k), strict=True
        ):
            self.lines[(version, s)] = line
        if self.task == "next-token":
            vocab = Vocab.from_dict(manifest.vocab)
            for start in range(0, len(todo), BATCH):
                part = todo[start : start + BATCH]
                nlls = _next_token_nll(model, vocab, [self.schedule.sequences[s] for s in part])
                for s, values in zip(part, nlls, strict=True):
                    self.nll[(version, s)] = values
        return True

    def compare(
        self, per_seq: dict[int, SeqPredictions], suspect: set[int] | None = None
    ) -> Agreement:
        """Check every sequence's streamed predictions against its version's offline pass.

        A sequence whose token predictions switch from one version to another once is checked
        against each swap policy in turn (keep, reset, rewarm with ``history`` tokens or the
        whole prefix); ``suspect`` sequences (no per-token predictions, but another version was
        serving during their lifetime) cannot be told apart and are not checked."""
        verdict = Agreement()
        by_version: dict[str, list[int]] = {}
        for s, preds in per_seq.items():
            versions = preds.versions()
            if len(versions) > 1:
                self._compare_span(verdict, preds, s)
            elif suspect and s in suspect:
                verdict.not_checked["may span a model swap (no per-token predictions)"] += (
                    preds.count
                )
            else:
                by_version.setdefault(versions.pop(), []).append(s)
        for version, seqs in by_version.items():
            if not self.run(version, seqs):
                verdict.not_checked[f"no model for version {version}"] += sum(
                    per_seq[s].count for s in seqs
                )
                continue
            for s in seqs:
                line = self.lines[(version, s)]
                self._compare_one(verdict, _per_token(line), line, per_seq[s], s)
        return verdict

    def _compare_span(self, verdict: Agreement, preds: SeqPredictions, s: int) -> None:
        """A sequence served by two versions: before the swap by the first version's pass,
        after it by the second's under the first swap policy that reproduces it."""
        positions = sorted(preds.tokens)
        order = [preds.tokens[p]["model_version"] for p in positions]
        cut = [i for i in range(1, len(order)) if order[i] != order[i - 1]]
        final = preds.final
        if len(cut) != 1 or (final is not None and final["model_version"] != order[-1]):
            verdict.not_checked["sequence spans more than one model swap"] += preds.count
            return
        swap_at, first, second = positions[cut[0]], order[0], order[-1]
        a, b = self.model(first), self.model(second)
        if a is None or b is None or not self.run(first, [s]):
            missing = first if a is None else second
            verdict.not_checked[f"no model for version {missing}"] += preds.count
            return
        before = _per_token(self.lines[(first, s)])[:swap_at]
        tried: list[tuple[str, Agreement]] = []
        for policy in ("keep", "reset", "rewarm"):
            after = self._after_swap(a, b, self.schedule.sequences[s].items, swap_at, policy)
            if after is None:
                continue  # this policy cannot apply between these two models
            trial = Agreement()
            self._compare_one(trial, before + after, None, preds, s)
            tried.append((policy, trial))
            if trial.mismatched == 0:
                break
        applied, best = tried[-1]
        if best.mismatched == 0:
            verdict.span_policies[applied] += 1
        verdict.checked += best.checked
        verdict.mismatched += best.mismatched
        verdict.max_diff = max(verdict.max_diff, best.max_diff)
        verdict.not_checked.update(best.not_checked)
        if best.mismatched and len(verdict.examples) < 5:
            verdict.examples.append(
                f"key {self.schedule.sequences[s].key!r}: swap {first} -> {second} at position "
                f"{swap_at} matches no policy (keep, reset, rewarm)"
            )

    @torch.inference_mode()
    def _after_swap(
        self,
        a: tuple[RecurrentModel, Manifest],
        b: tuple[RecurrentModel, Manifest],
        items: list[Any],
        swap_at: int,
        policy: str,
    ) -> list[dict[str, Any]] | None:
        """The second version's per-token outputs from ``swap_at`` on, under ``policy`` (None:
        ``keep`` between models whose architecture or vocabulary differ, which a swap
        refuses)."""
        (model_a, man_a), (model_b, man_b) = a, b
        vocab_a, vocab_b = Vocab.from_dict(man_a.vocab), Vocab.from_dict(man_b.vocab)
        device = model_b.embedding.weight.device
        encoded = vocab_b.encode(items)
        start, state = swap_at, None
        if policy == "keep":
            if keep_refusal(model_a.config, vocab_a, model_b.config, vocab_b) is not None:
                return None
            prefix = torch.tensor([vocab_a.encode(items[:swap_at])], dtype=torch.long)
            _, state = model_a(prefix.to(model_a.embedding.weight.device))
        elif policy == "rewarm":  # recomputed from the last `history` tokens (0: all of them)
            start = max(0, swap_at - self.history) if self.history else 0
            # the history holds the first version's ids: mapped through their strings, so a
            # token that version did not know stays <unk> under the second
            known = [vocab_a.itos[i] for i in vocab_a.encode(items[start:swap_at])]
            encoded[start:swap_at] = [vocab_b.stoi.get(t, vocab_b.unk_id) for t in known]
        ids = torch.tensor([encoded], dtype=torch.long, device=device)
        out, _ = model_b(ids[:, start:], state)
        logits = out[0, swap_at - start :]
        if self.task == "tag":
            labels = LabelSet.from_dict({"labels": man_b.labels or []})
            return _per_token(tag_line("", man_b.version, logits, labels))
        return _per_token(next_token_line("", man_b.version, logits, vocab_b, self.top_k))

    def _compare_one(
        self,
        verdict: Agreement,
        expected: list[dict[str, Any]],
        line: dict[str, Any] | None,
        preds: SeqPredictions,
        s: int,
    ) -> None:
        problems: list[str] = []
        for pos, pred in preds.tokens.items():
            kind = pred["type"]
            if kind not in ("next", "tag") or pos >= len(expected):
                # a running estimate: offline scoring has no per-prefix label line
                verdict.not_checked["running estimate (no offline line per prefix)"] += 1
                continue
            want = expected[pos]
            if kind == "next":
                ok, diff = same_top_k(pred["next"], want["next"])
            else:
                diff = abs(pred["prob"] - want["prob"])
                ok = pred["tag"] == want["tag"] or diff <= TOL
            verdict.checked += 1
            verdict.max_diff = max(verdict.max_diff, diff)
            if not ok or diff > TOL:
                problems.append(f"{pred['id']} ({kind} at position {pos})")
        final = preds.final
        if line is not None and final is not None and final["type"] in ("label", "translation"):
            verdict.checked += 1
            if final["type"] == "label":
                diff = max(abs(final["probs"][k] - v) for k, v in line["probs"].items())
                verdict.max_diff = max(verdict.max_diff, diff)
                tie = abs(final["probs"][line["label"]] - max(final["probs"].values())) <= TOL
                ok = diff <= TOL and (final["label"] == line["label"] or tie)
            else:
                ok = final["output"] == line["output"]
            if not ok:
                problems.append(f"{final['id']} ({final['type']})")
        if problems:
            verdict.mismatched += len(problems)
            if len(verdict.examples) < 5:
                key = self.schedule.sequences[s].key
                verdict.examples.append(f"key {key!r}: {', '.join(problems[:3])}")


def _per_token(line: dict[str, Any]) -> list[dict[str, Any]]:
    """A score line's per-token entries as prediction payloads (``next`` / ``tag``, ``prob``)."""
    if "next" in line:
        return [{"next": entry} for entry in line["next"]]
    if "tags" in line:
        return [{"tag": t, "prob": p} for t, p in zip(line["tags"], line["tag_probs"], strict=True)]
    return []


def same_top_k(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Same top-k tokens and probabilities (``TOL``), except near-ties that swapped places or
    crossed the k-th place; returns (agree, largest probability difference)."""
    pa = dict(zip(a["tokens"], a["probs"], strict=True))
    pb = dict(zip(b["tokens"], b["probs"], strict=True))
    diff = max((abs(x - y) for x, y in zip(a["probs"], b["probs"], strict=False)), default=0.0)
    if a["tokens"] == b["tokens"]:
        return diff <= TOL, diff
    for x, y in ((pa, pb), (pb, pa)):
        floor = min(y.values(), default=0.0)
        for token, prob in x.items():
            if token in y:
                diff = max(diff, abs(prob - y[token]))
            elif prob > floor + TOL:  # missing from the other top-k without being a tie
                return False, diff
    return diff <= TOL, diff


@torch.inference_mode()
def _next_token_nll(model: RecurrentModel, vocab: Vocab, seqs: list[SeqInfo]) -> list[list[float]]:
    """Per sequence, -log p(token i+1 | tokens ..i) for i < n-1 under the full pass."""
    device = model.embedding.weight.device
    rows = [vocab.encode(s.items) for s in seqs]
    width = max(len(r) for r in rows)
    src = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out, _ = model(src.to(device), None, lengths.to(device))
    logp = torch.log_softmax(out.float(), dim=-1).cpu()
    result: list[list[float]] = []
    for i, row in enumerate(rows):
        n = len(row)
        if n < 2:
            result.append([])
            continue
        nxt = torch.tensor(row[1:], dtype=torch.long)
        result.append((-logp[i, : n - 1].gather(1, nxt[:, None])[:, 0]).tolist())
    return result
