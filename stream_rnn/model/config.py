"""The one dataclass that describes a model completely.

A checkpoint stores ``ModelConfig.to_dict()`` and rebuilds the network from it, never
from the caller's flags (as nanoGPT's checkpoints store their model args).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast, get_args

from stream_rnn.model.exceptions import ModelConfigError

Task = Literal["next-token", "classify", "tag", "seq2seq"]
Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]

TASKS: tuple[str, ...] = get_args(Task)
CELLS: tuple[str, ...] = get_args(Cell)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network.

    * ``next-token``: many-to-many aligned; output at position t predicts token t+1.
    * ``tag``: many-to-many aligned; output at position t is a label for token t.
    * ``classify``: many-to-one; the output after the last token labels the sequence.
    * ``seq2seq``: encoder-decoder; the encoder's final state initialises the decoder.

    Example::

        cfg = ModelConfig(task="classify", cell="gru", vocab_size=120, num_labels=7)
        model = RecurrentModel(cfg)
    """

    task: Task
    cell: Cell
    vocab_size: int
    embed_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False
    tie_weights: bool = False
    num_labels: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_lstm(self) -> bool:
        return self.cell == "lstm"

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Width of the decoder's output: vocabulary or label count."""
        return self.num_labels if self.task in ("classify", "tag") else self.vocab_size

    @property
    def streamable(self) -> bool:
        """Whether the model can be advanced token by token (no future tokens needed)."""
        return not self.bidirectional

    def validate(self) -> None:
        def bad(field: str, value: object, why: str) -> ModelConfigError:
            return ModelConfigError(f"model config: {field}={value!r} is invalid: {why}")

        if self.task not in TASKS:
            raise bad("task", self.task, f"choose one of {', '.join(TASKS)}")
        if self.cell not in CELLS:
            raise bad("cell", self.cell, f"choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, value, "must be a positive integer")
        if self.vocab_size < 5:
            raise bad("vocab_size", self.vocab_size, "needs the 4 special tokens plus at least one")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise bad("dropout", self.dropout, "must be in [0, 1)")
        if self.dropout and self.num_layers == 1:
            raise bad(
                "dropout", self.dropout, "inter-layer dropout needs num_layers >= 2 (or set 0)"
            )
        if self.task in ("classify", "tag") and self.num_labels < 2:
            raise bad("num_labels", self.num_labels, f"task {self.task} needs at least 2 labels")
        if self.task in ("next-token", "seq2seq") and self.num_labels:
            raise bad("num_labels", self.num_labels, f"task {self.task} has no labels; set 0")
        if self.bidirectional and self.task == "next-token":
            raise bad(
                "bidirectional",
                True,
                "a next-token model cannot see the future it must predict; "
                "use bidirectional only for classify, tag or the seq2seq encoder",
            )
        if self.tie_weights:
            if self.task not in ("next-token", "seq2seq"):
                raise bad("tie_weights", True, "only next-token and seq2seq decoders emit tokens")
            if self.embed_dim != self.hidden_size:
                raise bad(
                    "tie_weights",
                    True,
                    f"tying needs embed_dim == hidden_size (got {self.embed_dim} and "
                    f"{self.hidden_size})",
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ModelConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(
                f"model config has unknown fields {unknown}; this version knows {sorted(known)} "
                "(was the checkpoint written by a newer stream_rnn?)"
            )
        missing = [n for n in ("task", "cell", "vocab_size") if n not in data]
        if missing:
            raise ModelConfigError(f"model config lacks required fields {missing}")
        return cls(**cast(dict[str, Any], data))
