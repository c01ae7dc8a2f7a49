"""Typed errors. Every message names the problem *and* the fix."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "IntegrityError",
    "KeyMismatchError",
    "MemoryLimitError",
    "NonFiniteError",
    "NotCachedError",
    "ProvenanceError",
    "ShapeError",
    "StoreError",
    "TdabenchError",
    "UnsafeFileError",
    "UnsafePathError",
]


class TdabenchError(Exception):
    """Base class of every error raised on purpose by tdabench."""


class ConfigError(TdabenchError, ValueError):
    """A configuration value or argument is invalid."""


class ShapeError(TdabenchError, ValueError):
    """A tensor has the wrong shape."""


class DataError(TdabenchError, ValueError):
    """A data loader or data set is empty or malformed."""


class CheckpointError(TdabenchError, ValueError):
    """A checkpoint does not fit the model or cannot be read."""


class NotCachedError(TdabenchError, RuntimeError, ValueError):
    """A method that needs ``cache()`` was called before it.

    Also a ``ValueError``: dattri raises ``ValueError`` for this misuse, so code written for
    dattri catches it unchanged."""


class NonFiniteError(TdabenchError, FloatingPointError):
    """A loss, gradient or score is NaN or infinite."""


class MemoryLimitError(TdabenchError, MemoryError):
    """An operation would exceed a documented memory limit."""


class UnsafeFileError(TdabenchError, ValueError):
    """A file would need code execution (e.g. unpickling) to load; it is refused."""


class StoreError(TdabenchError, RuntimeError):
    """A result store is corrupted, truncated or inconsistent."""


class KeyMismatchError(StoreError):
    """A store was opened with a ground-truth key different from the one it holds."""


class IntegrityError(StoreError):
    """A file is missing, truncated, unstamped or fails its content checksum."""


class ProvenanceError(StoreError):
    """A file was made for another configuration (benchmark, spec, data or ground-truth key)."""


class UnsafePathError(UnsafeFileError):
    """A name read from a manifest or index would leave its directory (``..``, absolute, symlink)."""


class DiskFullError(TdabenchError, OSError):
    """The disk, quota or file-size limit is full; retrying cannot help."""
