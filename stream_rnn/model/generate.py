"""One-to-many: continue a sequence from a prompt or from a key's state, and seq2seq decoding.

Sampling is greedy (argmax), or from ``softmax(logits / temperature)`` restricted to the
``top_k`` most likely tokens; a seed makes it reproducible. Generation never changes the
state it starts from (the stream engine relies on that for ``generate`` events).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stream_rnn.model.exceptions import ModelError
from stream_rnn.model.network import RecurrentModel, State


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def sample_next(
    logits: Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` (B, D) -> (B,).

    Example::

        tok = sample_next(model.head(state), temperature=0.8, top_k=5)
    """
    if greedy:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ModelError(f"temperature must be > 0, got {temperature}; use greedy for argmax")
    # shift by the max first: a tiny temperature then sends the others to -inf, not the max to inf
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
    scaled = shifted / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def continue_from(
    model: RecurrentModel,
    state: State,
    n: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Tensor:
    """Sample ``n`` tokens for every key in ``state`` (batch B) -> (B, n); ``state`` is untouched.

    The first token comes from the output after the key's last token (``model.head``); each
    sampled token is then fed back in.
    """
    if n < 0:
        raise ModelError(f"cannot generate n={n} tokens; n must be >= 0")
    device = model.embedding.weight.device
    gen = _generator(seed, device)
    logits = model.head(state)
    out: list[Tensor] = []
    for i in range(n):
        tok = sample_next(
            logits, greedy=greedy, temperature=temperature, top_k=top_k, generator=gen
        )
        out.append(tok)
        if i + 1 < n:
            step_out, state = model.step(tok[:, None], state)
            logits = step_out[:, -1]
    if not out:
        return torch.empty((logits.shape[0], 0), dtype=torch.long, device=device)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def generate(
    model: RecurrentModel,
    prompt: list[int],
    n: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[int]:
    """Continue ``prompt`` (token ids; may be empty = the zero start state) by ``n`` tokens."""
    if model.config.task != "next-token":
        raise ModelError(f"generation needs a next-token model, this one is {model.config.task!r}")
    state = model.init_state(1)
    if prompt:
        _, state = model.step(torch.tensor([prompt], device=model.embedding.weight.device), state)
    toks = continue_from(
        model, state, n, greedy=greedy, temperature=temperature, top_k=top_k, seed=seed
    )
    return [int(t) for t in toks[0].tolist()]


@torch.inference_mode()
def translate(
    model: RecurrentModel,
    state: State,
    *,
    bos_id: int,
    eos_id: int,
    max_len: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[list[int]]:
    """Seq2seq decoding from encoder states (batch B): token ids up to (excluding) ``<eos>``."""
    if model.config.task != "seq2seq":
        raise ModelError(f"translate() needs a seq2seq model, this one is {model.config.task!r}")
    device = model.embedding.weight.device
    gen = _generator(seed, device)
    state = model.bridge_state(state)
    batch = (state[0] if isinstance(state, tuple) else state).shape[1]
    tok = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows: list[Tensor] = []
    for _ in range(max_len):
        logits, state = model(tok[:, None], state)
        tok = sample_next(
            logits[:, -1], greedy=greedy, temperature=temperature, top_k=top_k, generator=gen
        )
        rows.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
    result: list[list[int]] = []
    ids = torch.stack(rows, dim=1).tolist() if rows else [[] for _ in range(batch)]
    for row in ids:
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result
