"""The engine: micro-batches of events in, predictions out, exact per-key state in between.

Per micro-batch: split events into phases so that a key's control events (end, reset,
generate) see exactly the tokens before them; per phase, find the keys' pool slots (one
C-level dict pass), lay chunk events (several tokens of a key in one message) out as
consecutive tokens of their key, group tokens by slot with tensor ops
(:mod:`~stream_rnn.engine.ragged`), gather the keys' states with one indexed read, advance
them with one packed network step (no padding: keys with several tokens take the extra
steps), write them back with one indexed write, then run the heads on all tokens at once.

:meth:`Engine.swap` changes the model between micro-batches; every state follows a policy
(:mod:`~stream_rnn.engine.versions`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import chain
from typing import Any, cast

import torch
from torch import Tensor

from stream_rnn.engine.events import END, GENERATE, RESET, TOKEN, BatchResult, Event, Rejection
from stream_rnn.engine.exceptions import EngineError, PoolError
from stream_rnn.engine.heads import Heads
from stream_rnn.engine.pool import StatePool
from stream_rnn.engine.ragged import group_slots, long_tensor, step_ragged
from stream_rnn.engine.served import Served
from stream_rnn.engine.versions import SwapPolicy, SwapReport, applicable_policy, check_policy
from stream_rnn.model.config import ModelConfig
from stream_rnn.model.generate import continue_from, translate
from stream_rnn.model.network import RecurrentModel, exact_float32
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import LabelSet, Vocab

_TOKENS_ONLY = {TOKEN}


class Engine:
    """Advance many keys' states through a model, token by token, in micro-batches.

    Example::

        model, manifest = load_checkpoint("runs/lang")
        engine = Engine(model, manifest, capacity=100_000)
        result = engine.process([Event("user-1", TOKEN, token=17, id="0:42"), ...])
        for prediction in result.predictions: ...
        report = engine.swap(new_model, new_manifest, "keep")  # every state follows the policy

    ``history`` (tokens per key, default 0: off) and ``swap_policy`` configure the pool the
    engine builds (see :class:`~stream_rnn.engine.pool.StatePool`); a given ``pool`` carries
    its own.
    """

    def __init__(
        self,
        model: RecurrentModel,
        manifest: Manifest,
        *,
        capacity: int = 100_000,
        ttl_s: float | None = None,
        retention_s: float | None = None,
        storage: str = "float32",
        running_estimate: bool = False,
        top_k: int = 5,
        max_output_len: int = 200,
        pool: StatePool | None = None,
        history: int | None = None,
        swap_policy: SwapPolicy | None = None,
    ) -> None:
        model.check_streamable()
        self.top_k, self.running_estimate = top_k, running_estimate
        # the model and every table derived from it: replaced as a whole by swap()
        self.served = Served.build(
            model.eval(), manifest, top_k=top_k, running_estimate=running_estimate
        )
        self.device = model.embedding.weight.device
        if self.device.type == "cuda":
            exact_float32()
        # not `pool or ...`: a pool has a length, so a fresh (empty) one is falsy, and the
        # caller's pool and its store (the worker's on-disk store) would be silently replaced
        self.pool = (
            pool
            if pool is not None
            else StatePool(
                model.config,
                capacity,
                device=self.device,
                storage=storage,
                ttl_s=ttl_s,
                retention_s=retention_s,
                history=history or 0,
                swap_policy=swap_policy,
            )
        )
        if pool is not None and (
            (history is not None and history != _history_of(pool))
            or (swap_policy is not None and swap_policy != pool.swap_policy)
        ):
            raise PoolError(
                "history and swap_policy of an engine given a pool are the pool's: set them "
                "on the StatePool"
            )
        self.pool.bind(manifest.version, self.model, self.vocab)
        # grouping scratch, one entry per pool slot (see ragged.group_slots)
        self._scratch = torch.empty(self.pool.capacity, dtype=torch.long)
        self.max_output_len = max_output_len

    @property
    def version(self) -> str:
        """The model version serving now; every resident state is of this version."""
        return self.served.manifest.version

    # Read-only views of ``served``: there is no setter, so nothing can replace one table
    # without the others (a swap replaces ``served`` whole).
    @property
    def model(self) -> RecurrentModel:
        return self.served.model

    @property
    def manifest(self) -> Manifest:
        return self.served.manifest

    @property
    def vocab(self) -> Vocab:
        return self.served.vocab

    @property
    def labels(self) -> LabelSet:
        return self.served.labels

    @property
    def heads(self) -> Heads:
        return self.served.heads

    # ------------------------------------------------------------------ model swap
    def swap(self, model: RecurrentModel, manifest: Manifest, policy: SwapPolicy) -> SwapReport:
        """Serve ``model`` (described by ``manifest``) from the next :meth:`process` on; every
        key's state follows ``policy``.

        * ``keep``: states carry on under the new weights; only allowed when the model config
          (dropout aside) and the vocabulary are identical, else the swap falls back to
          ``rewarm`` (with a token history) or ``reset``, and ``note`` says why;
        * ``reset``: states become zeros and their histories are cleared;
        * ``rewarm``: states are recomputed from zeros by the new model over each key's last
          tokens (mapped to the new vocabulary through their strings, unknown ones to
          ``<unk>``), in one packed pass per chunk of keys; without a history, ``reset``.

        ``pos``, ``seq`` and the applied offset and partition of every key stay as they are.
        Resident states change now and are dirty: the next :meth:`StatePool.take_dirty`
        returns every one of them, to be written with the next checkpoint or transaction.
        Stored states follow the same policy when their keys are next admitted (they are
        dirty from then on). Call it between micro-batches, on the thread that runs them.
        """
        started = time.perf_counter()
        policy = check_policy(policy)
        model.check_streamable()
        # everything that can refuse the new model does so before any state changes
        model = model.to(self.device).eval()
        served = Served.build(
            model, manifest, top_k=self.top_k, running_estimate=self.running_estimate
        )
        new_vocab = served.vocab
        old_version = self.version
        if manifest.version == old_version:
            if manifest.weights_sha256 != self.manifest.weights_sha256:
                raise EngineError(
                    f"model version {old_version} is served already with other weights "
                    f"(sha256 {self.manifest.weights_sha256[:12]}…, new "
                    f"{manifest.weights_sha256[:12]}…); a version names one set of weights: "
                    "publish the new weights under a new version"
                )
            applied: SwapPolicy = "keep"
            note = "same version: the model object is replaced, states stay"
            self.pool.bind(manifest.version, model, new_vocab)
            resident = len(self.pool)
        else:
            applied, note = applicable_policy(
                policy,
                (self.model.config, self.vocab),
                (model.config, new_vocab),
                history=self.pool.history is not None,
            )
            resident = self.pool.swap(model, manifest.version, new_vocab, applied)
        self.served = served  # every table of the new version at once
        stored = len(self.pool.store)
        if stored and manifest.version != old_version:
            note = f"{note}; " if note else ""
            note += f"{stored} stored states follow when their keys are next admitted"
        return SwapReport(
            policy_requested=policy,
            policy_applied=applied,
            keys_resident=resident,
            keys_stored=stored,
            seconds=time.perf_counter() - started,
            note=note,
            from_version=old_version,
            to_version=manifest.version,
        )

    def remember(self, manifest: Manifest) -> None:
        """Learn a past model version (its config and vocabulary) whose states may still be
        restored although this engine never swapped from it (after a restart): they then get
        an exact keep check and a vocabulary mapping for a rewarm under ``swap_policy``."""
        if self.pool.book is not None:
            config = ModelConfig.from_dict(manifest.model_config)
            self.pool.book.remember(manifest.version, config, Vocab.from_dict(manifest.vocab))

    # ------------------------------------------------------------------ entry point
    @torch.inference_mode()
    def process(self, events: Sequence[Event], served: Served | None = None) -> BatchResult:
        """Apply a micro-batch; per-key order is kept, keys are advanced in one batched step.

        ``served``: the tables the events' token ids were resolved with (the stream adapter
        passes the ``served`` it decoded against); refused unless it is the one serving now,
        as ids of one vocabulary mean other tokens, or nothing, in another's.
        """
        if served is not None and served is not self.served:
            raise EngineError(
                f"these events were decoded for model {served.version}, but the engine serves "
                f"{self.version} since a swap: decode the records again with engine.served"
            )
        result = BatchResult()
        if not events:
            return result
        if {e.kind for e in events} == _TOKENS_ONLY:
            self._tokens(list(events), result)
            return result
        # A key's n-th control event closes its phase n; tokens after it belong to phase n+1.
        phase_of: dict[str, int] = {}
        phases: list[tuple[list[Event], list[Event]]] = []
        for ev in events:
            p = phase_of.get(ev.key, 0)
            while len(phases) <= p:
                phases.append(([], []))
            if ev.kind == TOKEN:
                phases[p][0].append(ev)
            else:
                phases[p][1].append(ev)
                phase_of[ev.key] = p + 1
        for tokens, controls in phases:
            if tokens:
                self._tokens(tokens, result)
            if controls:
                self._controls(controls, result)
        return result

    # ------------------------------------------------------------------ tokens
    def _tokens(self, events: list[Event], result: BatchResult) -> None:
        keys = [e.key for e in events]
        # one C-level pass over the pool's key -> slot dict (a dict miss costs more than the
        # rest of a token's bookkeeping); None: not resident
        get = self.pool.slot_of.get
        resident = list(map(get, keys))
        if None not in resident:  # the usual case: every key is in the pool
            slots = long_tensor(cast(list[int], resident))
            self.pool.touch(slots)
            self._step(events, slots, result)
            return
        distinct = list(dict.fromkeys(keys))
        if len(distinct) <= self.pool.capacity:
            self.pool.lookup(distinct)  # admits (restores) the absent keys, touches all
            self._step(events, long_tensor(list(map(self.pool.slot_of.__getitem__, keys))), result)
            return
        # More distinct keys than the pool holds: step them in capacity-sized groups.
        group_of = {key: i // self.pool.capacity for i, key in enumerate(distinct)}
        for g in range(-(-len(distinct) // self.pool.capacity)):
            sub = [e for e in events if group_of[e.key] == g]
            self._tokens(sub, result)

    def _step(self, events: list[Event], at: Tensor, result: BatchResult) -> None:
        """Advance resident keys by ``events``; ``at`` (M,): each event's key's pool slot.

        A chunk event's tokens are laid out as consecutive tokens of its key (what follows
        works per token: N >= M), so they take the same packed step as single tokens."""
        m = len(events)
        pool = self.pool
        offsets = parts = None
        if events[0].offset >= 0:
            offsets = long_tensor([e.offset for e in events])
            parts = long_tensor([e.partition for e in events])
            known_part = pool.part.index_select(0, at)
            # Offsets only order events within one partition: a key that shows up on another
            # partition (producers with different partitioners) is never skipped by them.
            other = (known_part >= 0) & (known_part != parts)
            keep = (offsets < 0) | other | (offsets > pool.applied.index_select(0, at))
            if not bool(keep.all()):
                # redelivered after a restart: these tokens are already in their key's state
                kept = [events[i] for i in keep.nonzero().flatten().tolist()]
                result.skipped += m - len(kept)
                if kept:
                    self._tokens(kept, result)
                return
        ids = [e.token for e in events]
        counts: list[int] | None = None
        at_event = at
        if -1 in ids:  # some event is a chunk (token -1): lay its tokens out one by one
            chunks = [e.tokens for e in events]
            counts = [1 if c is None else len(c) for c in chunks]
            if 0 in counts:
                raise EngineError(
                    "a chunk event has no tokens; give every chunk at least one token id "
                    "(the stream adapter rejects empty chunks before they get here)"
                )
            ids = list(
                chain.from_iterable(
                    [t] if c is None else c for t, c in zip(ids, chunks, strict=True)
                )
            )
            at = at.repeat_interleave(long_tensor(counts))
        n = len(ids)
        # one packed step: every key's first token straight from the pool, then the keys with
        # more; per-token outputs in packed order (the heads put results in token order)
        slots, groups = group_slots(at, self._scratch)
        token_ids = long_tensor(ids)
        tokens = token_ids.to(self.device)
        feats, new_state = step_ragged(self.model, tokens, pool.gather(slots), groups)
        pool.scatter(slots, new_state)
        if pool.history is not None:
            pool.history.append(at, token_ids, groups.rank)
        pos, seq = pool.pos.index_select(0, at), pool.seq.index_select(0, at)
        if groups.rank is None:  # one event per key
            pool.pos.index_copy_(0, at, pos + 1)
        else:
            pos += groups.rank
            pool.pos.index_add_(0, at, torch.ones(n, dtype=torch.long))
        if offsets is not None and parts is not None:
            self._mark_applied(at_event, offsets, parts)
        if self.model.encoder is None:
            feats = self.model.decoder(feats)
        block = self.heads.token_block(events, feats, pos, seq, self.version, groups.packed, counts)
        if block is not None:
            result.items.append(block)
        result.tokens += n

    def _mark_applied(self, at: Tensor, offsets: Tensor, parts: Tensor) -> None:
        """Record events' source offsets and partitions at their keys' slots ``at``."""
        self.pool.applied.scatter_reduce_(0, at, offsets, reduce="amax")
        self.pool.part[at] = parts

    # ------------------------------------------------------------------ controls
    def _controls(self, events: list[Event], result: BatchResult) -> None:
        """Apply control events in order.

        ``reset`` starts a new sequence on the same state record (zeros, ``pos`` 0, ``seq`` + 1).
        ``end`` emits the sequence's result and then deletes the key (:meth:`StatePool.delete`:
        a tombstone at the next checkpoint); its next token starts a new state with ``seq`` 0.
        A redelivered control event is recognised by the key's applied offset, so a redelivered
        ``end`` finds no state and is rejected as ``unknown_key``; under the exactly-once
        guarantee that cannot happen, as the tombstone and the consumed offset commit together.
        """
        for ev in events:
            if not self.pool.known(ev.key):
                result.rejections.append(
                    Rejection(
                        ev,
                        "unknown_key",
                        f"{_kind(ev)} for key {ev.key!r}, which has no state (no token seen "
                        "since it was created, ended or retired); send tokens for the key first",
                    )
                )
                continue
            slots = self.pool.lookup([ev.key])
            slot = int(slots[0])
            if ev.offset >= 0:
                same_part = int(self.pool.part[slot]) in (-1, ev.partition)
                if same_part and ev.offset <= int(self.pool.applied[slot]):
                    result.skipped += 1  # redelivered: already applied
                    continue
                self._mark_applied(slots, torch.tensor([ev.offset]), torch.tensor([ev.partition]))
                self.pool.dirty[slots] = True
            seq = int(self.pool.seq[slot])
            base: dict[str, Any] = {
                "key": ev.key,
                "id": ev.id,
                "seq": seq,
                "pos": None,
                "model_version": self.version,
                "_ts": ev.ts,
            }
            if ev.kind == RESET:
                self.pool.clear(slots)
                # the key now starts a new sequence: report its number
                result.items.append({**base, "seq": seq + 1, "type": "reset"})
            elif ev.kind == END:
                n_tokens = int(self.pool.pos[slot])
                if n_tokens == 0:
                    result.rejections.append(
                        Rejection(
                            ev,
                            "unknown_key",
                            f"end for key {ev.key!r} with no open "
                            "sequence (no token since its last reset)",
                        )
                    )
                    continue
                payload = self._end_payload(slots, n_tokens)
                self.pool.delete(ev.key)  # the state's life ends with its sequence
                result.items.append({**base, **payload})
            elif ev.kind == GENERATE:
                payload_or_error = self._generate(ev, slots)
                if isinstance(payload_or_error, str):
                    result.rejections.append(Rejection(ev, "bad_value", payload_or_error))
                else:
                    result.items.append({**base, **payload_or_error})

    def _end_payload(self, slots: Tensor, n_tokens: int) -> dict[str, Any]:
        task = self.model.config.task
        state = self.pool.gather(slots)
        if task == "classify":
            return self.heads.label(self.model.head(state)[0])
        if task == "seq2seq":
            ids = translate(
                self.model,
                state,
                bos_id=self.vocab.bos_id,
                eos_id=self.vocab.eos_id,
                max_len=self.max_output_len,
            )[0]
            return {
                "type": "translation",
                "output": self.vocab.detok(ids),
                "output_tokens": self.vocab.decode(ids),
            }
        return {"type": "end", "n_tokens": n_tokens}

    def _generate(self, ev: Event, slots: Tensor) -> dict[str, Any] | str:
        if self.model.config.task != "next-token" or ev.gen is None:
            return (
                f"generate needs a next-token model with parameters; this model's task is "
                f"{self.model.config.task!r}"
            )
        g = ev.gen
        ids = continue_from(
            self.model,
            self.pool.gather(slots),
            g.n,
            greedy=g.greedy,
            temperature=g.temperature,
            top_k=g.top_k,
            seed=g.seed,
        )[0].tolist()
        return {
            "type": "generated",
            "tokens": self.vocab.decode(ids),
            "text": self.vocab.detok(ids),
        }


def _history_of(pool: StatePool) -> int:
    return pool.history.size if pool.history is not None else 0


def _kind(ev: Event) -> str:
    return {END: "end", RESET: "reset", GENERATE: "generate"}.get(ev.kind, "event")
