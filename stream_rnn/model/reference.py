"""The cell equations written out, one time step at a time, from plain-PyTorch weights.

This is the lecture's maths made executable and the independent reference the tests hold the
fast path to. Elman RNN (per layer l, weights named as ``torch.nn.RNN``)::

    a(t) = b + W h(t-1) + U x(t)        # b = bias_ih + bias_hh, W = weight_hh, U = weight_ih
    h(t) = tanh(a(t))   (or relu)
    o(t) = c + V h(t)                   # the decoder: c = decoder.bias, V = decoder.weight
    y(t) = softmax(o(t))

LSTM and GRU follow ``torch.nn.LSTM`` / ``torch.nn.GRU`` gate order (i, f, g, o) and (r, z, n).
Slow on purpose: it loops over time and layers in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stream_rnn.model.config import ModelConfig


def _cell(cfg: ModelConfig, w: dict[str, Tensor], layer: int, x: Tensor, h: Tensor, c: Tensor):
    wi, wh = w[f"rnn.weight_ih_l{layer}"], w[f"rnn.weight_hh_l{layer}"]
    bi, bh = w[f"rnn.bias_ih_l{layer}"], w[f"rnn.bias_hh_l{layer}"]
    if cfg.cell in ("rnn_tanh", "rnn_relu"):
        a = (bi + bh) + h @ wh.T + x @ wi.T
        return (torch.tanh(a) if cfg.cell == "rnn_tanh" else torch.relu(a)), c
    if cfg.cell == "lstm":
        gates = x @ wi.T + bi + h @ wh.T + bh
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    gi, gh = x @ wi.T + bi, h @ wh.T + bh
    ir, iz, inn = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(inn + r * hn)
    return (1 - z) * n + z * h, c


def reference_forward(
    cfg: ModelConfig, weights: dict[str, Tensor], tokens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Unidirectional forward over ``tokens`` (B, T) from zero state.

    Returns ``(logits (B, T, D), h_n (L, B, H), c_n (L, B, H))``; ``c_n`` is zeros except for LSTM.
    """
    batch, steps = tokens.shape
    layers, hidden = cfg.num_layers, cfg.hidden_size
    h = [torch.zeros(batch, hidden) for _ in range(layers)]
    c = [torch.zeros(batch, hidden) for _ in range(layers)]
    emb = weights["embedding.weight"][tokens]
    logits = []
    for t in range(steps):
        x = emb[:, t]
        for layer in range(layers):
            h[layer], c[layer] = _cell(cfg, weights, layer, x, h[layer], c[layer])
            x = h[layer]
        logits.append(x @ weights["decoder.weight"].T + weights["decoder.bias"])
    return torch.stack(logits, dim=1), torch.stack(h), torch.stack(c)
