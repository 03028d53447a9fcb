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


class PrecisionError(InputError):
    """float64 cannot certify the result at this input to the tolerance (a sigma so small,
    or a query so far from the data, that rounding cannot tell the rows that matter apart)."""


class DiskFullError(OptdenError, OSError):
    """A write ran out of space (ENOSPC, EDQUOT): the message names the directory and the
    bytes the write needed. Finished work written before it stays on disk."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..." form
        return str(self.args[0]) if self.args else "no space left on the device"
