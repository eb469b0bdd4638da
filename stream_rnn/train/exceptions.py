"""Errors raised by the training layer (data sets, vocabularies, training runs)."""

from __future__ import annotations


class TrainError(Exception):
    """Base class of every error the training layer raises on purpose."""


class DataError(TrainError):
    """Input data, a vocabulary or a label set is malformed.

    The message says where (file and line, or record key), what was wrong, and what to do.
    """


class RetrainError(TrainError):
    """A retraining run cannot go on: no production model, no data, too little to hold out.

    The message says what was missing, with the values, and what to do.
    """
