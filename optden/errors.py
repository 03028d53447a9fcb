"""optden's exceptions. Each subclasses the built-in a caller would expect to catch."""
from __future__ import annotations


class OptdenError(Exception):
    """Base class of every error optden raises on purpose."""


class InputError(OptdenError, ValueError):
    """An argument has the wrong shape, a bad value (NaN, inf, sigma <= 0), or is out of range."""


class DtypeError(OptdenError, TypeError):
    """An argument has an unsupported type or dtype (complex, object, ...)."""


class DatasetError(OptdenError, ValueError):
    """A dataset is empty, malformed, truncated, or does not match its metadata."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset directory or file does not exist."""


class ChecksumError(DatasetError):
    """A dataset file does not match the checksum recorded when it was saved."""


class BackendUnavailableError(OptdenError, RuntimeError):
    """A backend was forced that cannot run this input; the message lists why."""
