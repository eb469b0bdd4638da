"""Gradient diagnostics: how far back in time does the loss still reach?

For a batch of sequences of length T, the loss at the *last* step is backpropagated through
time and we record ``||dL_T / dh(t)||`` for every step t (h(t) = the whole recurrent state at t:
all layers, and the cell state c(t) too for LSTM), averaged over the batch. A tanh/ReLU Elman
RNN typically shows the norm collapsing (vanishing) or blowing up (exploding) as t moves away
from T; LSTM and GRU keep it alive much longer — the lecture's picture, measured.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.network import RecurrentModel, State


@dataclass
class GradCurve:
    """``norms[t]`` = mean over the batch of ``||dL_T / dh(t)||``, t = 0 .. T-1."""

    name: str
    norms: list[float]

    def horizon(self, drop: float = 1e-3) -> int:
        """Steps back from T until the norm first falls below ``drop`` x its value at T."""
        last = self.norms[-1]
        for back, value in enumerate(reversed(self.norms)):
            if value < drop * last:
                return back
        return len(self.norms)

    def summary(self) -> str:
        back = min(20, len(self.norms) - 1)
        ratio = self.norms[-1 - back] / self.norms[-1] if self.norms[-1] else 0.0
        return (
            f"|dL/dh(T)| {self.norms[-1]:.2e}; {back} steps back x{ratio:.1e}; "
            f"falls below 1e-3 of it after {self.horizon()} steps"
        )


def state_gradient_norms(model: RecurrentModel, tokens: Tensor, target: Tensor) -> list[float]:
    """Per-step gradient norms of the last step's loss w.r.t. the recurrent state.

    ``tokens`` (B, T) unpadded; ``target`` (B,) — the class (classify) or the next token
    (other tasks) that the last step is scored against.
    """
    if model.config.bidirectional:
        raise ValueError("gradient report needs a unidirectional model")
    # float64 copy: vanishing gradients underflow float32 to exactly 0 within ~40 steps,
    # which would hide the slope the report is about.
    model = copy.deepcopy(model).double().train(False)
    batch, steps = tokens.shape
    state: State = model.init_state(batch, tokens.device)
    kept: list[list[Tensor]] = []
    logits: Tensor | None = None
    emb = model.embedding(tokens)
    for t in range(steps):
        _, state = model.rnn(emb[:, t : t + 1], state)
        parts = list(state) if isinstance(state, tuple) else [state]
        for p in parts:
            p.retain_grad()
        kept.append(parts)
        # Score the state itself (the top layer's h equals the output) so dL/dh(T) is recorded.
        logits = model.decoder(parts[0][-1])
    if logits is None:
        raise ValueError("gradient report needs sequences of at least one token")
    loss = F.cross_entropy(logits, target)
    model.zero_grad(set_to_none=True)
    loss.backward()
    norms = []
    for parts in kept:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parts]
        per_example = torch.cat([g.permute(1, 0, 2).reshape(batch, -1) for g in grads], dim=1)
        norms.append(float(per_example.norm(dim=1).mean()))
    return norms


def compare_cells(
    cells: list[str],
    *,
    length: int = 100,
    hidden: int = 64,
    layers: int = 1,
    vocab_size: int = 32,
    batch: int = 16,
    seed: int = 0,
) -> list[GradCurve]:
    """Fresh (PyTorch-default-initialised) next-token models of each cell on random tokens."""
    curves = []
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (batch, length), generator=gen)
    target = torch.randint(4, vocab_size, (batch,), generator=gen)
    for cell in cells:
        torch.manual_seed(seed)
        cfg = ModelConfig(
            task="next-token",
            cell=cell,  # type: ignore[arg-type]
            vocab_size=vocab_size,
            embed_dim=hidden,
            hidden_size=hidden,
            num_layers=layers,
        )
        curves.append(GradCurve(cell, state_gradient_norms(RecurrentModel(cfg), tokens, target)))
    return curves


def write_report(curves: list[GradCurve], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``grad_norms.csv`` (name, t, steps_before_loss, norm) and ``grad_norms.png``."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "grad_norms.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "t", "steps_before_loss", "grad_norm"])
        for c in curves:
            steps = len(c.norms)
            for t, v in enumerate(c.norms):
                writer.writerow([c.name, t, steps - 1 - t, f"{v:.6e}"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in curves:
        ax.semilogy(range(len(c.norms)), [max(v, 1e-30) for v in c.norms], label=c.name)
    ax.set_xlabel("time step t (loss taken at the last step)")
    ax.set_ylabel("mean ||dL_T / dh(t)||  (log scale)")
    ax.set_title(title or "Gradient reaching each time step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = out / "grad_norms.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    return [table, plot]


def model_gradient_report(
    model_dir: str | Path,
    records: list,  # list[Record]; untyped here to keep this module free of the data layer
    out_dir: str | Path,
    *,
    length: int = 100,
    batch: int = 32,
) -> list[Path]:
    """Gradient report for a trained checkpoint next to a freshly initialised twin.

    Uses up to ``batch`` of the longest ``records``, cropped to a common length
    (at most ``length``); the last step is scored against the record's label (classify) or
    the true next token.
    """
    from stream_rnn.registry.checkpoint import load_checkpoint
    from stream_rnn.train.vocab import LabelSet, Vocab

    model, manifest = load_checkpoint(model_dir)
    vocab = Vocab.from_dict(manifest.vocab)
    encoded = sorted(
        ((vocab.encode(r.items(vocab.level)), r) for r in records),
        key=lambda pair: -len(pair[0]),
    )[:batch]
    if not encoded or len(encoded[-1][0]) < 2:
        raise ValueError("gradient report needs sequences of at least 2 tokens")
    steps = min(length, len(encoded[-1][0]) - 1)
    tokens = torch.tensor([ids[:steps] for ids, _ in encoded])
    if model.config.task == "classify":
        labels = LabelSet.from_dict({"labels": manifest.labels})
        target = torch.tensor([labels.index(str(r.label)) for _, r in encoded])
    else:
        target = torch.tensor([ids[steps] for ids, _ in encoded])
    torch.manual_seed(0)
    fresh = RecurrentModel(model.config)
    curves = [
        GradCurve(f"{model.config.cell} trained", state_gradient_norms(model, tokens, target)),
        GradCurve(f"{model.config.cell} init", state_gradient_norms(fresh, tokens, target)),
    ]
    return write_report(curves, out_dir, f"dL_T/dh(t) for {manifest.version}, T={steps}")
