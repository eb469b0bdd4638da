"""Errors of the replay tool: bad input files or options, an unreachable live system."""

from __future__ import annotations


class ReplayError(Exception):
    """A replay cannot run as asked; the message says what was wrong and what to do."""
