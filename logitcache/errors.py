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


class NonFiniteLossError(LogitcacheError):
    """A training step's loss is NaN/Inf: the run stops before the optimizer steps; no weights are saved."""


class TemperatureNotRecorded(LogitcacheError, ValueError):
    """A loss asked for a temperature the cache did not record."""


class CacheError(LogitcacheError):
    """A cache is missing, malformed, unfinished or damaged."""


class CacheMetadataError(CacheError):
    """A cache's metadata (a zarr.json, a marker, the stored manifest) is malformed, mistyped or beyond the
    format's limits; the message names the object and the key. Not damage to units: `--repair` refuses."""


class DamagedUnitError(CacheError):
    """A finished unit's stored objects do not match its marker (missing, other bytes) or hold insane values;
    the message names the unit and the commands to run (`logitcache verify`, `dump --repair`)."""


class CacheMismatchError(CacheError):
    """A cache does not match the data, recipe or settings it is used with; the message names what differs."""


class ReplayMismatchError(CacheMismatchError):
    """The views replayed here are not the pixels the cache's teacher saw (a changed decoder or resampler)."""


class CacheWriteError(CacheError):
    """Writing a cache object failed (disk full, permission denied, network); the message names the unit and the
    object. Units finished before stay valid; rerunning the dump completes the rest."""


class UnsafeCheckpointError(LogitcacheError):
    """A checkpoint needs pickle to load (weights_only=True refused it)."""


class ModelError(LogitcacheError, ValueError):
    """A model name is unknown, an optional backend (timm) is missing, or a USKD weak-head site cannot be found."""


class WeightsError(LogitcacheError):
    """Weights cannot be resolved, downloaded, read, or do not fit the model (the message lists the keys at fault)."""


class BadSampleError(DataError):
    """One sample's bytes are bad (undecodable image, missing/non-integer/out-of-range label).

    The only kind of data error that ``skip_bad`` mode skips: it names ``url:key`` and keeps its global index.
    """

    def __init__(self, url: str, key: str | None = None, reason: str | None = None, kind: str = "bad sample"):
        # one argument = an already formatted message (how DataLoader re-raises a worker's error)
        super().__init__(url if key is None else f"{url}:{key}: {reason}")
        self.url, self.key, self.reason, self.kind = url, key, reason, kind

    def __reduce__(self):  # picklable across DataLoader workers despite the custom __init__
        return type(self), (self.url, self.key, self.reason, self.kind)


class ShardFormatError(DataError):
    """A shard's tar structure is broken (truncated tar, duplicate key, unreadable member): never skipped,
    because the indices of the samples in it can no longer be trusted."""


class ShardChangedError(ManifestError):
    """A shard differs from its manifest entry (size, sample count, keys, sha256); the message says what."""


class ShardSelectionError(LogitcacheError, ValueError):
    """A ``--shards`` selection is malformed or names shards the dataset does not have."""


class RecipeError(LogitcacheError, ValueError):
    """A view recipe is unknown, has settings this version cannot apply, or params do not fit an image."""


class RunError(LogitcacheError):
    """A run directory (metrics.jsonl, val_reliability.json, config.json) is missing or malformed."""
