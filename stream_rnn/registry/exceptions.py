"""Errors raised by the model registry and checkpoint loading."""


class RegistryError(Exception):
    """Base class for every error of :mod:`stream_rnn.registry`."""


class CheckpointError(RegistryError):
    """A checkpoint directory is missing, incomplete, tampered with or inconsistent."""
