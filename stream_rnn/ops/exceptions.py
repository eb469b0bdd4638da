"""Errors raised by the ops layer (local broker, deployment helpers).

Every message says what was wrong, with the offending value, and what to do about it, so that
the CLI can print ``str(error)`` and nothing else.

Example::

    from stream_rnn.ops.exceptions import OpsError

    try:
        LocalKafka(data_dir).start()
    except OpsError as error:
        raise SystemExit(str(error)) from error
"""

from __future__ import annotations

__all__ = [
    "OpsError",
    "ToolNotFoundError",
    "KafkaJarsError",
    "KafkaDataDirError",
    "KafkaStartError",
    "KafkaStopError",
]


class OpsError(Exception):
    """Base class of every error raised by :mod:`stream_rnn.ops`."""


class ToolNotFoundError(OpsError):
    """An external program (``java``, ``mvn``) is missing or too old."""


class KafkaJarsError(OpsError):
    """The Kafka broker jars could not be resolved into the local cache."""


class KafkaDataDirError(OpsError):
    """A broker data directory is unusable (foreign, half-written or for another version)."""


class KafkaStartError(OpsError):
    """The local broker could not be formatted, launched or reached in time."""


class KafkaStopError(OpsError):
    """The local broker did not exit, even after SIGKILL."""
