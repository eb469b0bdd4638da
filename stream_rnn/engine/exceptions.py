"""Errors raised by the engine (the Kafka-free core of the stream side)."""


class EngineError(Exception):
    """Base class for every error of :mod:`stream_rnn.engine`."""


class PoolError(EngineError):
    """The state pool was asked for something it cannot do (e.g. capacity too small)."""


class StateCodecError(EngineError, ValueError):
    """A serialized state record is damaged or of an unknown format."""
