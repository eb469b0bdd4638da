"""Errors raised by the model registry, checkpoint loading and model-update announcements.

Every message says what was wrong, with the offending value, and what to do about it, so
that the CLI can print ``str(error)`` and nothing else.
"""

from __future__ import annotations

from typing import Literal, get_args

RejectReason = Literal[
    "malformed",
    "unsigned",
    "bad_signature",
    "unreadable",
    "checksum",
    "shapes",
    "non_finite",
    "incompatible",
    "stale",  # a sequence number at or below one already seen: a replayed announcement
    "domain",  # signed for another registry or updates topic (another environment)
]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)


class RegistryError(Exception):
    """Base class for every error of :mod:`stream_rnn.registry`."""


class CheckpointError(RegistryError):
    """A checkpoint directory is missing, incomplete, tampered with or inconsistent."""


class UpdateRejected(RegistryError):
    """A model-update announcement that a worker must not apply.

    ``reason`` is one of `REJECT_REASONS` (a stable code for metrics and logs); ``detail`` is a
    sentence for the operator: what was wrong, with the value, and what to do.

    >>> err = UpdateRejected(reason="unsigned", detail="update m-1 carries no signature")
    >>> err.reason, str(err)
    ('unsigned', 'model update rejected (unsigned): update m-1 carries no signature')
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; use one of {REJECT_REASONS}")
        # Both go to Exception.__init__ so that args survive pickling (threads, process pools).
        super().__init__(reason, detail)
        self.reason: RejectReason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"model update rejected ({self.reason}): {self.detail}"

    def __repr__(self) -> str:
        return f"UpdateRejected({self.reason!r}, {self.detail!r})"


class AnnouncementError(RegistryError):
    """The model-updates topic could not be created, written or read to its end."""
