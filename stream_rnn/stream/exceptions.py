"""Errors raised by the stream layer (message decoding, dead letters, schemas)."""

from __future__ import annotations

from stream_rnn.stream.reasons import Reason


class StreamError(Exception):
    """Base class of every error the stream layer raises on purpose."""


class Rejected(StreamError, ValueError):
    """An input message the worker cannot use; it belongs on the dead-letter topic.

    ``reason`` is one of the codes in `stream_rnn.stream.reasons.REASONS`; ``detail`` is a
    sentence for the producer: what was wrong, with the value, and what to do.

    >>> err = Rejected("bad_version", "unsupported schema version 'v'=2; send v=1")
    >>> err.reason, str(err)
    ('bad_version', "bad_version: unsupported schema version 'v'=2; send v=1")
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        # Both go to Exception.__init__ so that args survive pickling (process pools, faust).
        super().__init__(reason, detail)
        self.reason: Reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __repr__(self) -> str:
        return f"Rejected({self.reason!r}, {self.detail!r})"


class MalformedMessage(StreamError, ValueError):
    """A prediction or dead letter that does not match its schema.

    These messages are written by this project, so a failure points at a bug in the writer
    (or at a reader that is older than the writer); the message names the field.
    """
