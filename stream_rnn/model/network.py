"""The recurrent network: embedding -> stacked RNN/LSTM/GRU -> linear decoder.

Two ways to run it that agree exactly (float32, max abs difference 1e-5):

* :meth:`RecurrentModel.forward` — the full-sequence pass used by training and offline scoring;
* :meth:`RecurrentModel.step` — advances many independent states (one per key) by one or more
  tokens each, the primitive behind the streaming engine.

Weights live in plain ``torch.nn`` modules so their names are the plain PyTorch names
(``embedding.weight``, ``rnn.weight_ih_l0`` …, ``decoder.weight``); anyone can load them into
``torch.nn.Embedding`` / ``RNN`` / ``LSTM`` / ``GRU`` / ``Linear``. The seq2seq encoder adds
``encoder.embedding.*`` and ``encoder.rnn.*`` (and ``bridge.*`` for a bidirectional encoder);
its decoder side reuses the plain names, so it reads like a conditional language model.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stream_rnn.model.config import ModelConfig
from stream_rnn.model.exceptions import StreamingNotSupportedError

# ``(num_layers, batch, hidden)`` for RNN/GRU, ``(h, c)`` of that shape for LSTM — exactly what
# ``torch.nn.RNN/GRU/LSTM`` take and return.
State: TypeAlias = Tensor | tuple[Tensor, Tensor]


def make_rnn(config: ModelConfig, input_size: int, *, bidirectional: bool) -> nn.RNNBase:
    """Build the ``torch.nn`` recurrent module for ``config`` (batch_first=True)."""
    common = dict(
        input_size=input_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        batch_first=True,
        bidirectional=bidirectional,
    )
    if config.cell == "lstm":
        return nn.LSTM(**common)
    if config.cell == "gru":
        return nn.GRU(**common)
    nonlinearity = "tanh" if config.cell == "rnn_tanh" else "relu"
    return nn.RNN(nonlinearity=nonlinearity, **common)


class _Encoder(nn.Module):
    """Source side of a seq2seq model (its own embedding and RNN)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = make_rnn(config, config.embed_dim, bidirectional=config.bidirectional)


class RecurrentModel(nn.Module):
    """Embedding, stacked recurrent cells and a linear decoder, for all four problem types.

    Example::

        cfg = ModelConfig(task="next-token", cell="gru", vocab_size=64, num_layers=2)
        model = RecurrentModel(cfg).eval()
        logits, state = model(torch.tensor([[5, 6, 7]]))          # full sequence
        out, s = model.step(torch.tensor([[5], [9]]), None)        # two keys, one token each
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        seq2seq = config.task == "seq2seq"
        # In seq2seq only the encoder may be bidirectional; the decoder generates left to right.
        self.rnn = make_rnn(
            config, config.embed_dim, bidirectional=config.bidirectional and not seq2seq
        )
        feature = config.hidden_size * (
            config.num_directions if config.task in ("classify", "tag") else 1
        )
        self.decoder = nn.Linear(feature, config.output_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.encoder: _Encoder | None = _Encoder(config) if seq2seq else None
        self.bridge: nn.Linear | None = (
            nn.Linear(2 * config.hidden_size, config.hidden_size)
            if seq2seq and config.bidirectional
            else None
        )

    # ------------------------------------------------------------------ states
    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zero state for ``batch`` new keys (what a key has before its first token)."""
        cfg = self.config
        dirs = cfg.num_directions
        device = device if device is not None else self.embedding.weight.device
        shape = (cfg.num_layers * dirs, batch, cfg.hidden_size)
        h = torch.zeros(shape, device=device, dtype=self.embedding.weight.dtype)
        return (h, torch.zeros_like(h)) if cfg.is_lstm else h

    # ------------------------------------------------------------------ core pass
    def _run(
        self,
        rnn: nn.RNNBase,
        embedded: Tensor,
        lengths: Tensor | None,
        state: State | None,
        exact_state: bool = True,
    ) -> tuple[Tensor, State]:
        """Run ``rnn`` over padded ``embedded`` (B, T, E).

        With ``exact_state`` the returned state is each row's state after its own last valid
        token (a packed pass). Without it, a unidirectional pass runs unpacked: outputs at valid
        positions never depend on the padding after them, so training (which only reads those
        outputs) gets the faster fused kernel; the returned state then includes the padding.
        """
        steps = embedded.shape[1]
        unpacked_ok = not exact_state and not rnn.bidirectional
        if lengths is None or unpacked_ok or bool((lengths == steps).all()):
            return rnn(embedded, state)
        packed = pack_padded_sequence(
            embedded, lengths.to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        out_packed, new_state = rnn(packed, state)
        out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=steps)
        return out, new_state

    def forward(
        self,
        tokens: Tensor,
        state: State | None = None,
        lengths: Tensor | None = None,
        *,
        exact_state: bool = True,
    ) -> tuple[Tensor, State]:
        """Full-sequence pass: ``tokens`` (B, T) -> ``(logits (B, T, output_size), h_n)``.

        For seq2seq this runs the *decoder side* (a conditional language model) from ``state``;
        use :meth:`encode` first. ``lengths`` (B,) marks the valid prefix of each row; outputs at
        padded positions are zero-input garbage that callers mask, and ``h_n`` is each row's state
        after its own last valid token.
        """
        out, h_n = self._run(self.rnn, self.embedding(tokens), lengths, state, exact_state)
        return self.decoder(out), h_n

    def features(
        self, tokens: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Top-layer RNN outputs (B, T, H*dirs) and the final state, without the decoder."""
        return self._run(self.rnn, self.embedding(tokens), lengths, state)

    def classify(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Many-to-one: label logits (B, num_labels) from each sequence's final features.

        Unidirectional: the top layer's output after the last valid token. Bidirectional: the
        forward direction's last output next to the backward direction's output at position 0.
        """
        out, _ = self._run(self.rnn, self.embedding(tokens), lengths, None, exact_state=False)
        batch, steps = tokens.shape
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.long, device=tokens.device)
        idx = (lengths.to(tokens.device) - 1).clamp(min=0)
        rows = torch.arange(batch, device=tokens.device)
        last = out[rows, idx]
        if self.config.bidirectional:
            # The backward direction has read the whole sequence when it reaches position 0.
            hidden = self.config.hidden_size
            last = torch.cat([last[:, :hidden], out[:, 0, hidden:]], dim=1)
        return self.decoder(last)

    # ------------------------------------------------------------------ seq2seq
    def encode(self, src: Tensor, lengths: Tensor | None = None) -> State:
        """Run the seq2seq encoder; its final state (pass it through :meth:`bridge_state` to
        initialise the decoder — :func:`~stream_rnn.model.generate.translate` does that)."""
        if self.encoder is None:
            raise StreamingNotSupportedError(
                f"encode() needs a seq2seq model, this one is {self.config.task!r}"
            )
        _, h_n = self._run(self.encoder.rnn, self.encoder.embedding(src), lengths, None)
        return h_n

    def bridge_state(self, h_n: State) -> State:
        """Map an encoder state to a decoder state (merging directions if bidirectional)."""
        if self.bridge is None:
            return h_n
        bridge = self.bridge

        def merge(t: Tensor) -> Tensor:
            layers = self.config.num_layers
            t = t.view(layers, 2, t.shape[1], t.shape[2])
            return torch.tanh(bridge(torch.cat([t[:, 0], t[:, 1]], dim=-1)))

        if isinstance(h_n, tuple):
            return merge(h_n[0]), merge(h_n[1])
        return merge(h_n)

    # ------------------------------------------------------------------ streaming
    def check_streamable(self) -> None:
        if not self.config.streamable:
            raise StreamingNotSupportedError(
                "this model has a bidirectional encoder: its backward direction reads the "
                "sequence from the end, so it needs future tokens and cannot be streamed. "
                "Use it for training and offline scoring (stream-rnn score), or train a "
                "unidirectional model (bidirectional=False) for streaming."
            )

    @torch.inference_mode()
    def step(
        self,
        tokens: Tensor,
        state: State | None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        """Advance a batch of independent states by one or more tokens each.

        ``tokens`` (B, T): row b holds key b's next ``lengths[b]`` tokens (1 <= lengths[b] <= T,
        the rest is padding). ``state``: the keys' states, batch dimension = B (``None`` = new
        keys). Returns per-token outputs (B, T, D) — logits for next-token/tag/classify (for
        classify a running estimate after every token), encoder outputs for seq2seq — and the
        new states, each after that key's own last token. Runs in inference mode.
        """
        feats, new_state = self.step_features(tokens, state, lengths)
        if self.encoder is not None:
            return feats, new_state
        return self.decoder(feats), new_state

    @torch.inference_mode()
    def step_features(
        self,
        tokens: Tensor,
        state: State | None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        """Like :meth:`step` but returns the top layer's outputs (B, T, H), before the decoder.

        Rows of different lengths are advanced column by column: column 0 steps every row
        straight from ``state``, column t >= 1 steps only the rows with more than t tokens
        (indexed in and out; padded outputs stay zero). Each call is the fused single-step
        kernel; on CPU this beats a packed pass by far for the typical micro-batch (most keys
        one token, a few keys several).
        """
        emb_layer, rnn = self.stream_modules()
        batch, steps = tokens.shape
        if state is None:
            state = self.init_state(batch, tokens.device)
        if lengths is None:
            return rnn(emb_layer(tokens), state)
        lengths = lengths.to("cpu")
        if bool((lengths < 1).any()) or bool((lengths > steps).any()):
            raise ValueError(
                f"step(): every key must be advanced by 1..{steps} tokens (at least one token), "
                f"got lengths {lengths.tolist()}"
            )
        emb = emb_layer(tokens)
        if bool((lengths == steps).all()):
            return rnn(emb, state)
        first, state = rnn(emb[:, :1], state)
        out = first.new_zeros((batch, steps, first.shape[-1]))
        out[:, 0] = first[:, 0]
        for t in range(1, int(lengths.max())):
            rows = (lengths > t).nonzero().flatten().to(tokens.device)
            o, new = rnn(emb[rows, t : t + 1], select_state(state, rows))
            out[rows, t] = o[:, 0]
            put_state(state, rows, new)
        return out, state

    def stream_modules(self) -> tuple[nn.Embedding, nn.RNNBase]:
        """The embedding and RNN that streaming advances (the encoder's for seq2seq)."""
        self.check_streamable()
        if self.encoder is not None:
            return self.encoder.embedding, self.encoder.rnn
        return self.embedding, self.rnn

    @torch.inference_mode()
    def head(self, state: State) -> Tensor:
        """Output for a batch of states (B, D): what ``step`` returned after their last token.

        For next-token this is the next-token distribution's logits; generation starts here.
        """
        h = state[0] if isinstance(state, tuple) else state
        return self.decoder(h[-1])


def exact_float32() -> None:
    """Turn off TF32 on CUDA (matmul and cuDNN RNNs).

    TF32 rounds inputs to 10 mantissa bits; it would break the 1e-5 streaming == offline
    contract on Ampere+ GPUs. The engine calls this when it runs on CUDA.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def state_batch(state: State) -> int:
    """Number of keys in a state."""
    return (state[0] if isinstance(state, tuple) else state).shape[1]


def select_state(state: State, index: Tensor) -> State:
    """Rows ``index`` of a state, along the batch dimension."""
    if isinstance(state, tuple):
        return state[0].index_select(1, index), state[1].index_select(1, index)
    return state.index_select(1, index)


def put_state(state: State, index: Tensor, rows: State) -> None:
    """Write ``rows`` into ``state`` at batch positions ``index``, in place."""
    if isinstance(state, tuple) and isinstance(rows, tuple):
        state[0].index_copy_(1, index, rows[0])
        state[1].index_copy_(1, index, rows[1])
    elif isinstance(state, Tensor) and isinstance(rows, Tensor):
        state.index_copy_(1, index, rows)
    else:
        raise TypeError("put_state: state and rows must both be tensors or both (h, c) pairs")
