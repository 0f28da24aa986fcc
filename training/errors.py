"""Typed, user-facing training errors: each message says what to fix. Raised before any training starts."""

from __future__ import annotations


class TrainingError(ValueError):
    """Base class; `peftserve train` prints the message without a traceback."""


class TrainConfigError(TrainingError):
    """A method option or training hyper-parameter is out of range or inconsistent."""


class DataError(TrainingError):
    """The training/eval data is missing, empty or lacks the configured fields."""


class OutputExistsError(TrainingError):
    """The output directory exists and is not empty (pass --overwrite to replace it)."""


class RegisterError(TrainingError):
    """Posting the finished adapter to a running server failed."""
