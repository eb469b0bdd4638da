"""Model versions of states: swap policies, and what a state of another version becomes.

A state belongs to the model version that produced it. When the engine swaps models, every
state follows a policy:

* ``keep`` — the state carries on under the new weights (only its version tag changes);
  allowed only between models of the same architecture and vocabulary;
* ``reset`` — the state becomes the new model's initial state (zeros), its token history is
  cleared; counters and the applied offset stay;
* ``rewarm`` — the state is recomputed from zeros by the new model over the key's retained
  token history (ids mapped to the new vocabulary through their strings).

Resident states follow the policy at the swap; stored ones (evicted, or restored from the
state topic) when they are next admitted to the pool. A :class:`VersionBook` records every
transition so that a state several versions behind gets exactly what it would have got had it
stayed resident through each swap, and gives states of versions it cannot trace the
deployment's policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from torch import Tensor

from stream_rnn.engine.exceptions import PoolError
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel
from stream_rnn.train.vocab import Vocab

SwapPolicy = Literal["keep", "reset", "rewarm"]
SWAP_POLICIES: tuple[str, ...] = get_args(SwapPolicy)


def check_policy(policy: object) -> SwapPolicy:
    if policy not in SWAP_POLICIES:
        raise PoolError(f"swap policy {policy!r} is unknown; use one of {', '.join(SWAP_POLICIES)}")
    return cast(SwapPolicy, policy)


@dataclass(frozen=True)
class SwapReport:
    """What :meth:`~stream_rnn.engine.engine.Engine.swap` did.

    ``keys_resident`` states were converted during the swap; ``keys_stored`` states sat in the
    store and follow ``policy_applied`` when their keys are next admitted to the pool.
    ``note`` says why ``policy_applied`` differs from ``policy_requested``, if it does.
    """

    policy_requested: SwapPolicy
    policy_applied: SwapPolicy
    keys_resident: int
    keys_stored: int
    seconds: float
    note: str
    from_version: str = ""
    to_version: str = ""


def keep_refusal(
    old: ModelConfig, old_vocab: Vocab, new: ModelConfig, new_vocab: Vocab
) -> str | None:
    """Why states of the ``old`` model cannot carry on under the ``new`` one (None: they can).

    ``dropout`` is ignored: it only acts during training, never on a streamed state.
    """
    if old_vocab.itos != new_vocab.itos or old_vocab.level != new_vocab.level:
        return (
            f"keep needs an identical vocabulary, the new model's differs ({len(old_vocab)} -> "
            f"{len(new_vocab)} tokens, {len(set(old_vocab.itos) - set(new_vocab.itos))} gone)"
        )
    old_d, new_d = old.to_dict(), new.to_dict()
    old_d.pop("dropout")
    new_d.pop("dropout")
    differ = sorted(k for k in old_d if old_d[k] != new_d[k])
    if differ:
        shown = ", ".join(f"{k} {old_d[k]!r} -> {new_d[k]!r}" for k in differ)
        return f"keep needs the same architecture, the models differ in {shown}"
    return None


def applicable_policy(
    policy: SwapPolicy,
    old: tuple[ModelConfig, Vocab],
    new: tuple[ModelConfig, Vocab],
    *,
    history: bool,
) -> tuple[SwapPolicy, str]:
    """The policy a swap from ``old`` to ``new`` (config, vocabulary) applies when asked for
    ``policy``, and why it differs ("" if it does not): a refused keep falls back to rewarm
    (with a token ``history``) or reset, a rewarm without a history to reset."""
    fallback: SwapPolicy = "rewarm" if history else "reset"
    if policy == "keep":
        refusal = keep_refusal(old[0], old[1], new[0], new[1])
        if refusal is not None:
            return fallback, f"{refusal}; applied {fallback} instead"
    if policy == "rewarm" and not history:
        return "reset", "rewarm needs a token history (the pool keeps none); applied reset"
    return policy, ""


def vocab_map(old: Vocab, new: Vocab) -> Tensor | None:
    """Old token id -> new token id (int64), through the tokens' strings (unknown: ``<unk>``);
    ``None`` when the vocabularies are the same."""
    if old.itos == new.itos:
        return None
    stoi, unk = new.stoi, new.unk_id
    return torch.tensor([stoi.get(tok, unk) for tok in old.itos], dtype=torch.long)


def map_ids(ids: Tensor, id_map: Tensor | None, vocab_size: int, unk: int = 1) -> Tensor:
    """``ids`` through ``id_map`` (None: unchanged); ids outside the map or the target
    vocabulary become ``unk``, so that a history never indexes past an embedding."""
    if id_map is not None:
        inside = (ids >= 0) & (ids < len(id_map))
        ids = torch.where(inside, id_map[ids.clamp(0, len(id_map) - 1)], unk)
    return torch.where((ids >= 0) & (ids < vocab_size), ids, unk)


def _compose(first: Tensor | None, then: Tensor | None) -> Tensor | None:
    if first is None:
        return then
    return first if then is None else then[first]


@dataclass(frozen=True)
class Plan:
    """What a state of another version becomes: ``policy``; for ``rewarm``, the ``model`` to
    rewarm it with and the map of its history's ids into that model's vocabulary (of
    ``vocab_size`` tokens). ``retag``: the state's version changes (its record must be
    written again); ``reason``: why, in words."""

    policy: SwapPolicy
    retag: bool = True
    model: RecurrentModel | None = None
    id_map: Tensor | None = None
    vocab_size: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Transition:
    """One swap: states of ``source`` became states of ``target`` under ``policy``."""

    source: str
    target: str
    policy: SwapPolicy
    id_map: Tensor | None = None  # rewarm: source vocabulary ids -> target ids (None: same)


class VersionBook:
    """The model versions one pool has served, and what a state of each becomes now.

    ``policy`` is the deployment's: what a state of a version the book cannot trace to the
    current one gets (a record restored from the state topic after a restart, written before
    a swap this process did not see). ``adopt_unversioned``: a state without a version (written
    before states recorded theirs) is taken as the current version's, so that upgrading the
    software keeps every key's state; otherwise it gets ``policy`` too.

    Example::

        book = VersionBook("v1", model_v1, vocab_v1, policy="reset", history=False)
        book.advance("v2", model_v2, vocab_v2, "keep")
        book.plan("v1", fits=True).policy   # 'keep'
    """

    def __init__(
        self,
        version: str,
        model: RecurrentModel,
        vocab: Vocab,
        *,
        policy: SwapPolicy,
        history: bool,
        adopt_unversioned: bool = True,
    ) -> None:
        self.version, self.model, self.vocab = version, model, vocab
        self.policy = check_policy(policy)
        self.history = history
        self.adopt_unversioned = adopt_unversioned
        self._known: dict[str, tuple[ModelConfig, Vocab]] = {version: (model.config, vocab)}
        self._transitions: dict[str, Transition] = {}  # by source: the latest way out of it
        # the models of rewarm targets whose states may still be rewarmed lazily (see _prune)
        self._models: dict[str, RecurrentModel] = {}
        self._plans: dict[tuple[str | None, bool], Plan] = {}
        self._lineage: list[tuple[str, SwapPolicy]] = []  # see announce()

    @property
    def transitions(self) -> list[Transition]:
        return list(self._transitions.values())

    def announce(self, policy: SwapPolicy, lineage: Sequence[tuple[str, SwapPolicy]] = ()) -> None:
        """What the swaps this process did not see asked for: ``policy``, the one announced
        with the version served now, replaces the deployment's for states it cannot trace;
        ``lineage`` (the registry's promotions, oldest first: version and the policy its
        announcement asked for) folds the policies between a state's version and the current
        one, as a worker that stayed up through them would have applied them."""
        self.policy = check_policy(policy)
        self._lineage = [(v, check_policy(p)) for v, p in lineage]
        self._plans.clear()

    def remember(self, version: str, config: ModelConfig, vocab: Vocab) -> None:
        """Learn a past version's architecture and vocabulary, so that its states (restored
        without a recorded transition) get an exact keep check and a rewarm mapping."""
        self._known.setdefault(version, (config, vocab))
        self._plans.clear()

    def advance(
        self, version: str, model: RecurrentModel, vocab: Vocab, policy: SwapPolicy
    ) -> Transition:
        """Record the swap from the current version to ``version`` under ``policy``."""
        old = self.version
        self._models[old] = self.model
        id_map = vocab_map(self.vocab, vocab) if policy == "rewarm" else None
        step = Transition(old, version, check_policy(policy), id_map)
        self._transitions[old] = step
        self._transitions.pop(version, None)  # the current version leads nowhere
        self.version, self.model, self.vocab = version, model, vocab
        self._known[version] = (model.config, vocab)
        self._plans.clear()
        self._prune()
        return step

    def _chain(self, version: str) -> list[Transition] | None:
        steps: list[Transition] = []
        seen = {version}
        while version != self.version:
            step = self._transitions.get(version)
            if step is None or step.target in seen:
                return None
            steps.append(step)
            seen.add(step.target)
            version = step.target
        return steps

    def _prune(self) -> None:
        """Keep only the models a lazy rewarm may still need: the target of a rewarm that
        only ``keep`` swaps separate from the current version (one, short of rollbacks)."""
        needed = set()
        for step in self._transitions.values():
            chain = self._chain(step.target) if step.policy == "rewarm" else None
            if chain is not None and all(s.policy == "keep" for s in chain):
                needed.add(step.target)
        self._models = {v: m for v, m in self._models.items() if v in needed}

    def plan(self, version: str | None, fits: bool) -> Plan:
        """What a state of ``version`` becomes now; ``fits``: its tensors have the current
        model's shape (a keep needs it)."""
        key = (version, fits)
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = self._plan(version, fits)
        return found

    def _plan(self, version: str | None, fits: bool) -> Plan:
        if version == self.version:
            plan = Plan("keep", retag=False, reason="current version")
        elif version is None and self.adopt_unversioned:
            plan = Plan("keep", reason="a state without a version is taken as the current one")
        else:
            chain = self._chain(version) if version is not None else None
            plan = self._fold(chain) if chain is not None else self._untraced(version)
        if plan.policy == "keep" and not fits:
            why = f"its shape does not fit the model of version {self.version}"
            plan = self._fallback(version, why)
        return plan

    def _fold(self, chain: list[Transition]) -> Plan:
        """The transitions of a state's version up to the current one, applied in turn."""
        policy: SwapPolicy = "keep"
        target, id_map, cleared = "", None, False
        for step in chain:
            if step.policy == "reset" or (step.policy == "rewarm" and cleared):
                # a rewarm over a cleared history gives zeros, as a reset does
                policy, id_map, cleared = "reset", None, True
            elif step.policy == "rewarm":
                policy, target = "rewarm", step.target
                id_map = _compose(id_map, step.id_map)
        reason = " -> ".join([chain[0].source, *(f"{s.target} ({s.policy})" for s in chain)])
        if policy != "rewarm":
            return Plan(policy, reason=reason)
        model = self.model if target == self.version else self._models.get(target, self.model)
        return Plan("rewarm", model=model, id_map=id_map, vocab_size=len(self.vocab), reason=reason)

    def _lineage_policy(self, version: str | None) -> tuple[SwapPolicy, str] | None:
        """The announced policies from ``version`` to the current one, folded (None: the
        lineage does not lead from it): a reset anywhere clears the state, else a rewarm
        recomputes it, else it is kept."""
        names = [v for v, _ in self._lineage]
        if version is None or version not in names or self.version not in names:
            return None
        start = len(names) - 1 - names[::-1].index(version)
        end = len(names) - 1 - names[::-1].index(self.version)
        if start >= end:
            return None
        steps = self._lineage[start + 1 : end + 1]
        policies = {p for _, p in steps}
        folded: SwapPolicy = (
            "reset" if "reset" in policies else "rewarm" if "rewarm" in policies else "keep"
        )
        path = " -> ".join([version, *(f"{v} ({p})" for v, p in steps)])
        return folded, f"registry lineage {path}"

    def _untraced(self, version: str | None) -> Plan:
        """A state whose version no swap of this process leads from: the announced policies
        of the registry's lineage, or the one announced with the current version (the
        deployment's before any announcement). A keep needs the state's version to be known
        (verified): a state of a version this process cannot verify is never kept blindly."""
        shown = "no version" if version is None else f"version {version}"
        policy = self.policy
        reason = f"{shown} (no recorded swap to {self.version}): policy {policy}"
        traced = self._lineage_policy(version)
        if traced is not None:
            policy, reason = traced
        known = self._known.get(version) if version is not None else None
        if policy == "keep":
            if known is None:
                return self._fallback(version, f"{reason}; {shown} is unknown or unverified")
            refusal = keep_refusal(known[0], known[1], self.model.config, self.vocab)
            if refusal is not None:
                return self._fallback(version, refusal)
        if policy == "rewarm":
            return self._fallback(version, reason, rewarm_reason=reason)
        return Plan(policy, reason=reason)

    def _vocab_of(self, version: str | None) -> Vocab | None:
        if version == self.version or (version is None and self.adopt_unversioned):
            return self.vocab
        known = self._known.get(version) if version is not None else None
        return known[1] if known is not None else None

    def _fallback(self, version: str | None, why: str, rewarm_reason: str = "") -> Plan:
        """Rewarm (with a history and a known vocabulary) or reset, when a keep cannot be."""
        reason = rewarm_reason or f"keep refused ({why})"
        vocab = self._vocab_of(version)
        if self.history and vocab is not None:
            return Plan(
                "rewarm",
                model=self.model,
                id_map=vocab_map(vocab, self.vocab),
                vocab_size=len(self.vocab),
                reason=f"{reason}: rewarm",
            )
        if self.history:
            reason += f"; the vocabulary of {version} is unknown (Engine.remember its manifest)"
        return Plan("reset", reason=f"{reason}: reset")
