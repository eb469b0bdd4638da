"""Errors raised by the model layer."""


class ModelError(Exception):
    """Base class for every error of :mod:`stream_rnn.model`."""


class ModelConfigError(ModelError, ValueError):
    """A model configuration is invalid (the message names the field and the fix)."""


class StreamingNotSupportedError(ModelError):
    """The model cannot be advanced token by token (e.g. a bidirectional encoder)."""


class WeightsError(ModelError):
    """Weights do not fit the model: a tensor is missing, unexpected, mis-shaped or not finite."""
