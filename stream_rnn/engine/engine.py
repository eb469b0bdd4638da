"""The engine: micro-batches of events in, predictions out, exact per-key state in between.

Per micro-batch: split events into phases so that a key's control events (end, reset,
generate) see exactly the tokens before them; per phase, group tokens by key with tensor ops
(stable sort, per-group ranks), gather the keys' states with one indexed read, advance them
with one batched (packed when a key has several tokens) network step, write them back with
one indexed write, then run the heads on all tokens at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stream_rnn.engine.events import END, GENERATE, RESET, TOKEN, BatchResult, Event, Rejection
from stream_rnn.engine.heads import Heads
from stream_rnn.engine.pool import StatePool
from stream_rnn.model.generate import continue_from, translate
from stream_rnn.model.network import RecurrentModel, exact_float32
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import LabelSet, Vocab


class Engine:
    """Advance many keys' states through a model, token by token, in micro-batches.

    Example::

        model, manifest = load_checkpoint("runs/lang")
        engine = Engine(model, manifest, capacity=100_000)
        result = engine.process([Event("user-1", TOKEN, token=17, id="0:42"), ...])
        for prediction in result.predictions: ...
    """

    def __init__(
        self,
        model: RecurrentModel,
        manifest: Manifest,
        *,
        capacity: int = 100_000,
        ttl_s: float | None = None,
        storage: str = "float32",
        running_estimate: bool = False,
        top_k: int = 5,
        max_output_len: int = 200,
        pool: StatePool | None = None,
    ) -> None:
        model.check_streamable()
        self.model = model.eval()
        self.manifest = manifest
        self.vocab = Vocab.from_dict(manifest.vocab)
        self.labels = LabelSet.from_dict({"labels": manifest.labels or []})
        self.device = model.embedding.weight.device
        if self.device.type == "cuda":
            exact_float32()
        # not `pool or ...`: a pool has a length, so a fresh (empty) one is falsy, and the
        # caller's pool and its store (the worker's on-disk store) would be silently replaced
        self.pool = (
            pool
            if pool is not None
            else StatePool(model.config, capacity, device=self.device, storage=storage, ttl_s=ttl_s)
        )
        self.heads = Heads(model.config.task, self.vocab, self.labels, top_k, running_estimate)
        self.max_output_len = max_output_len

    @property
    def version(self) -> str:
        return self.manifest.version

    # ------------------------------------------------------------------ entry point
    @torch.inference_mode()
    def process(self, events: Sequence[Event]) -> BatchResult:
        """Apply a micro-batch; per-key order is kept, keys are advanced in one batched step."""
        result = BatchResult()
        if not events:
            return result
        if all(e.kind == TOKEN for e in events):
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
        index: dict[str, int] = {}
        inv_list = [index.setdefault(e.key, len(index)) for e in events]
        keys = list(index)
        capacity = self.pool.capacity
        if len(keys) <= capacity:
            self._step(events, keys, inv_list, result)
            return
        # More distinct keys than the pool holds: step them in capacity-sized groups.
        for start in range(0, len(keys), capacity):
            chunk = set(range(start, min(start + capacity, len(keys))))
            sub = [e for e, g in zip(events, inv_list, strict=True) if g in chunk]
            sub_index: dict[str, int] = {}
            sub_inv = [sub_index.setdefault(e.key, len(sub_index)) for e in sub]
            self._step(sub, list(sub_index), sub_inv, result)

    def _step(
        self, events: list[Event], keys: list[str], inv_list: list[int], result: BatchResult
    ) -> None:
        n = len(events)
        inv = torch.tensor(inv_list, dtype=torch.long)
        tokens = torch.tensor([e.token for e in events], dtype=torch.long)
        counts = torch.bincount(inv, minlength=len(keys))
        width = int(counts.max())
        if width == 1:
            rank = torch.zeros(n, dtype=torch.long)
            grid = torch.empty((len(keys), 1), dtype=torch.long)
            grid[inv, 0] = tokens
            lengths = None
        else:
            # rank of each event inside its key's group, keeping arrival order (stable sort)
            order = torch.sort(inv, stable=True).indices
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.empty(n, dtype=torch.long)
            rank[order] = torch.arange(n) - starts[inv[order]]
            grid = torch.zeros((len(keys), width), dtype=torch.long)
            grid[inv, rank] = tokens
            lengths = counts
        slots = self.pool.lookup(keys)
        offsets: Tensor | None = None
        if events[0].offset >= 0:
            offsets = torch.tensor([e.offset for e in events], dtype=torch.long)
            parts = torch.tensor([e.partition for e in events], dtype=torch.long)
            known_part = self.pool.part[slots][inv]
            # Offsets only order events within one partition: a key that shows up on another
            # partition (producers with different partitioners) is never skipped by them.
            other = (known_part >= 0) & (known_part != parts)
            keep = (offsets < 0) | other | (offsets > self.pool.applied[slots][inv])
            if not bool(keep.all()):
                # redelivered after a restart: these tokens are already in their key's state
                kept = [events[i] for i in keep.nonzero().flatten().tolist()]
                result.skipped += n - len(kept)
                if kept:
                    index: dict[str, int] = {}
                    regrouped = [index.setdefault(e.key, len(index)) for e in kept]
                    self._step(kept, list(index), regrouped, result)
                return
        state = self.pool.gather(slots)
        feats, new_state = self.model.step_features(grid.to(self.device), state, lengths)
        self.pool.scatter(slots, new_state)
        pos = self.pool.pos[slots][inv] + rank
        seq = self.pool.seq[slots][inv]
        self.pool.pos[slots] += counts
        if offsets is not None:
            self._mark_applied(slots, inv, offsets, [e.partition for e in events])
        # decoder only on the N real positions, not on the (keys x width) padded grid
        per_event = feats[inv.to(self.device), rank.to(self.device)]
        if self.model.encoder is None:
            per_event = self.model.decoder(per_event)
        block = self.heads.token_block(events, per_event, pos, seq, self.version)
        if block is not None:
            result.items.append(block)
        result.tokens += n

    def _mark_applied(
        self, slots: Tensor, inv: Tensor, offsets: Tensor, partitions: list[int]
    ) -> None:
        pool = self.pool
        last = torch.full((len(slots),), -1, dtype=torch.long).scatter_reduce(
            0, inv, offsets, reduce="amax"
        )
        pool.applied[slots] = torch.maximum(pool.applied[slots], last)
        part = torch.empty(len(slots), dtype=torch.long)
        part[inv] = torch.tensor(partitions, dtype=torch.long)
        pool.part[slots] = part

    # ------------------------------------------------------------------ controls
    def _controls(self, events: list[Event], result: BatchResult) -> None:
        for ev in events:
            if not self.pool.known(ev.key):
                result.rejections.append(
                    Rejection(
                        ev,
                        "unknown_key",
                        f"{_kind(ev)} for key {ev.key!r}, which has no state (no token seen, "
                        "or it was ended and expired); send tokens for the key first",
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
                self._mark_applied(
                    slots,
                    torch.zeros(1, dtype=torch.long),
                    torch.tensor([ev.offset]),
                    [ev.partition],
                )
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
                            "sequence (no token since its last end or reset)",
                        )
                    )
                    continue
                payload = self._end_payload(slots, n_tokens)
                self.pool.clear(slots)
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


def _kind(ev: Event) -> str:
    return {END: "end", RESET: "reset", GENERATE: "generate"}.get(ev.kind, "event")
