"""The project's exceptions. Each message names the file / shard / key / unit at fault and what was wrong.

All derive from `LogitcacheError`, which the CLI turns into a clean one-line error and a non-zero exit.
"""

from __future__ import annotations


class LogitcacheError(Exception):
    """Base class: a user-facing error with a message that says what and where."""


class DataError(LogitcacheError):
    """A shard or sample is bad: corrupt image, bad label, truncated tar, changed shard."""


class ManifestError(DataError):
    """A manifest is missing, malformed, or does not match the shards it describes."""


class NonFiniteLogitsError(LogitcacheError):
    """A teacher produced NaN/Inf logits; they are never written to a cache."""


class TemperatureNotRecorded(LogitcacheError, ValueError):
    """A loss asked for a temperature the cache did not record."""


class CacheError(LogitcacheError):
    """A cache is missing, malformed, unfinished or damaged."""


class CacheMismatchError(CacheError):
    """A cache does not match the data, recipe or settings it is used with; the message names what differs."""


class UnsafeCheckpointError(LogitcacheError):
    """A checkpoint needs pickle to load (weights_only=True refused it)."""
