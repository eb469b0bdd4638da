"""Small pure functions for what changes over a training run: learning rate, teacher forcing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stream_rnn.train.exceptions import TrainError

TFSchedule = Literal["constant", "linear", "inverse-sigmoid"]
LRSchedule = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class TeacherForcing:
    """Probability of feeding the ground-truth token (not the model's own sample) at a step.

    * ``constant``: always ``ratio``.
    * ``linear``: from ``ratio`` down to ``min_ratio`` over ``decay_steps`` updates.
    * ``inverse-sigmoid``: scheduled sampling (Bengio et al., 2015),
      ``k / (k + exp(step / k))`` with ``k`` = ``sigmoid_k``, never above ``ratio``.

    Example::

        tf = TeacherForcing("linear", ratio=1.0, min_ratio=0.5, decay_steps=1000)
        tf.at(500)   # 0.75
    """

    schedule: TFSchedule = "constant"
    ratio: float = 1.0
    min_ratio: float = 0.0
    decay_steps: int = 1000
    sigmoid_k: float = 100.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "linear", "inverse-sigmoid"):
            raise TrainError(
                f"teacher-forcing schedule {self.schedule!r} is unknown; "
                "use constant, linear or inverse-sigmoid"
            )
        if not 0.0 <= self.min_ratio <= self.ratio <= 1.0:
            raise TrainError(
                f"teacher forcing needs 0 <= min_ratio <= ratio <= 1, got "
                f"min_ratio={self.min_ratio}, ratio={self.ratio}"
            )
        if self.decay_steps < 1 or self.sigmoid_k < 1:
            raise TrainError("teacher forcing decay_steps and sigmoid_k must be >= 1")

    def at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.ratio
        if self.schedule == "linear":
            frac = min(step / self.decay_steps, 1.0)
            return self.ratio - (self.ratio - self.min_ratio) * frac
        k = self.sigmoid_k
        value = k / (k + math.exp(min(step / k, 700.0)))
        return max(self.min_ratio, min(self.ratio, value))


def get_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    schedule: LRSchedule = "constant",
    warmup_steps: int = 0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for update ``step`` (0-based): linear warm-up, then the schedule's decay."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    frac = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - frac)
    if schedule == "cosine":
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    raise TrainError(
        f"learning-rate schedule {schedule!r} is unknown; use constant, cosine, linear"
    )
