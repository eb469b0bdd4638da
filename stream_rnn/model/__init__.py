"""The network and its maths; nothing here knows about streams or Kafka."""

from stream_rnn.model.config import CELLS, TASKS, ModelConfig
from stream_rnn.model.exceptions import (
    ModelConfigError,
    ModelError,
    StreamingNotSupportedError,
    WeightsError,
)
from stream_rnn.model.generate import continue_from, generate, sample_next, translate
from stream_rnn.model.network import RecurrentModel, State, select_state, state_batch

__all__ = [
    "CELLS",
    "TASKS",
    "ModelConfig",
    "ModelConfigError",
    "ModelError",
    "RecurrentModel",
    "State",
    "StreamingNotSupportedError",
    "WeightsError",
    "continue_from",
    "generate",
    "sample_next",
    "select_state",
    "state_batch",
    "translate",
]
