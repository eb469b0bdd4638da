"""Per-task losses and metrics: BPTT, truncated BPTT and teacher forcing.

Everything here is a small function of (model, batch) so the trainer's loop stays readable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stream_rnn.model.generate import translate
from stream_rnn.model.network import RecurrentModel, State
from stream_rnn.train.batching import IGNORE, Batch
from stream_rnn.train.exceptions import TrainError


def _detach(state: State | None) -> State | None:
    if state is None:
        return None
    if isinstance(state, tuple):
        return state[0].detach(), state[1].detach()
    return state.detach()


def _mask_state(keep: Tensor, new: State, old: State) -> State:
    mask = keep.view(1, -1, 1)
    if isinstance(new, tuple) and isinstance(old, tuple):
        return torch.where(mask, new[0], old[0]), torch.where(mask, new[1], old[1])
    if isinstance(new, tuple) or isinstance(old, tuple):
        raise TypeError("cannot mix LSTM (h, c) states with RNN/GRU states")
    return torch.where(mask, new, old)


def run_teacher_forced(
    model: RecurrentModel,
    inputs: Tensor,
    state: State | None,
    lengths: Tensor | None,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, State]:
    """Run the token-emitting side over ``inputs`` (B, T) with teacher-forcing ``ratio``.

    At ``ratio >= 1`` this is one fused pass. Below 1, each step t > 0 feeds the ground-truth
    token with probability ``ratio`` and otherwise a token sampled from the model's own
    (detached) prediction at t-1 — scheduled sampling. Rows past their length keep their state.
    """
    if ratio >= 1.0:
        # Callers read outputs at valid positions only, so the final state may include padding.
        return model(inputs, state, lengths, exact_state=False)
    batch, steps = inputs.shape
    if state is None:
        state = model.init_state(batch, inputs.device)
    outs: list[Tensor] = []
    prev: Tensor | None = None
    for t in range(steps):
        x = inputs[:, t]
        if prev is not None:
            coin = torch.rand(batch, generator=generator, device=inputs.device)
            x = torch.where(coin < ratio, x, prev)
        logits, new_state = model(x[:, None], state)
        if lengths is not None:
            new_state = _mask_state(lengths.to(inputs.device) > t, new_state, state)
        state = new_state
        outs.append(logits[:, 0])
        probs = torch.softmax(logits[:, 0].detach().float(), dim=-1)
        prev = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.stack(outs, dim=1), state


def sequence_loss(
    model: RecurrentModel,
    batch: Batch,
    tf_ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean loss over the batch (full BPTT) and the logits it came from."""
    task = model.config.task
    if task == "classify":
        logits = model.classify(batch.src, batch.lengths)
        return F.cross_entropy(logits, batch.labels), logits
    if task == "tag":
        logits, _ = model(batch.src, None, batch.lengths, exact_state=False)
        return F.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE
        ), logits
    if task == "next-token":
        logits, _ = run_teacher_forced(model, batch.src, None, batch.lengths, tf_ratio, generator)
        return F.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE
        ), logits
    state = model.bridge_state(model.encode(batch.src, batch.lengths))
    logits, _ = run_teacher_forced(
        model, batch.dec_in, state, batch.dec_lengths, tf_ratio, generator
    )
    return F.cross_entropy(
        logits.flatten(0, 1), batch.dec_out.flatten(), ignore_index=IGNORE
    ), logits


def tbptt_losses(
    model: RecurrentModel,
    batch: Batch,
    k1: int,
    k2: int,
    tf_ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Truncated BPTT(k1, k2): one loss per update, every ``k1`` tokens, backprop over ``k2``.

    Update i covers chunk i (k1 tokens) and is computed by re-running the last k2 tokens from
    the detached state k2 tokens back, so gradients flow k2 steps into the past while the state
    itself is carried across the whole sequence. The caller backpropagates each loss and steps
    the optimizer before asking for the next one.
    """
    task = model.config.task
    if task not in ("next-token", "tag"):
        raise TrainError(
            f"truncated BPTT applies to aligned tasks (next-token, tag), not {task!r}; "
            "train it with full BPTT (leave --tbptt unset)"
        )
    if model.config.bidirectional:
        raise TrainError("truncated BPTT needs a unidirectional model (state flows forward)")
    if k1 < 1 or k2 < k1 or k2 % k1:
        raise TrainError(
            f"truncated BPTT needs 1 <= k1 <= k2 with k2 a multiple of k1; got k1={k1}, k2={k2}"
        )
    steps = batch.src.shape[1]
    n_chunks = math.ceil(steps / k1)
    span = k2 // k1
    starts: dict[int, State | None] = {0: None}  # detached state at the start of chunk j
    for i in range(n_chunks):
        first = max(0, i - span + 1)
        state = starts[first]
        loss: Tensor | None = None
        for j in range(first, i + 1):
            lo, hi = j * k1, min((j + 1) * k1, steps)
            # Padding is fed like any token: its outputs are masked out of the loss and the
            # state of a finished row is never used again.
            logits, state = run_teacher_forced(
                model, batch.src[:, lo:hi], state, None, tf_ratio if j == i else 1.0, generator
            )
            if j + 1 not in starts:
                starts[j + 1] = _detach(state)
            if j == i:
                targets = batch.targets[:, lo:hi]
                if bool((targets != IGNORE).any()):
                    loss = F.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
                    )
        starts.pop(first - 1, None)
        if loss is not None:
            yield loss


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int
    exact_match: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self, task: str) -> dict[str, float]:
        out = {"loss": self.loss, "accuracy": self.accuracy}
        if task in ("next-token", "seq2seq"):
            out["perplexity"] = self.perplexity
        if self.exact_match is not None:
            out["exact_match"] = self.exact_match
        return out


@torch.no_grad()
def evaluate(
    model: RecurrentModel,
    batches: list[Batch],
    device: torch.device,
    *,
    bos_id: int = 2,
    eos_id: int = 3,
) -> EvalResult:
    """Loss (token-weighted for aligned tasks), accuracy and, for seq2seq, greedy exact match."""
    was_training = model.training
    model.eval()
    total, correct, count, exact, n_seq = 0.0, 0, 0, 0, 0
    task = model.config.task
    for cpu_batch in batches:
        batch = cpu_batch.to(device)
        loss, logits = sequence_loss(model, batch)
        if task == "classify":
            n = batch.size
            correct += int((logits.argmax(-1) == batch.labels).sum())
        else:
            targets = batch.dec_out if task == "seq2seq" else batch.targets
            valid = targets != IGNORE
            n = int(valid.sum())
            correct += int(((logits.argmax(-1) == targets) & valid).sum())
        total += float(loss) * n
        count += n
        if task == "seq2seq":
            max_len = int(batch.dec_lengths.max()) + 5
            decoded = translate(
                model,
                model.encode(batch.src, batch.lengths),
                bos_id=bos_id,
                eos_id=eos_id,
                max_len=max_len,
            )
            for row, ref_len, ref in zip(
                decoded, batch.dec_lengths.tolist(), batch.dec_in.tolist(), strict=True
            ):
                exact += int(row == ref[1:ref_len])
                n_seq += 1
    model.train(was_training)
    if count == 0:
        raise TrainError("evaluation data is empty; give --valid a file with sequences")
    return EvalResult(
        loss=total / count,
        accuracy=correct / count,
        count=count,
        exact_match=exact / n_seq if task == "seq2seq" and n_seq else None,
    )
