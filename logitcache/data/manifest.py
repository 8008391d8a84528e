"""The dataset manifest: which shards, in which order, with which facts, and the fingerprint over all of them.

``manifest.json`` lives next to the shards. For every shard it records the name (relative to the manifest's
directory), byte size, sha256 of the file, sample count and a digest of its keys; plus the class names. The
dataset **fingerprint** is sha256 over a canonical JSON of exactly those facts, so re-encoding one image (same
keys, other bytes) changes it. Every sample has a stable **global index** = its shard's ``first_index`` + its
position in the shard; positions count every key, including samples later skipped as corrupt.

Shard names are relative to the manifest's directory, or absolute paths / URLs (``s3://...``), or webdataset
``pipe:`` commands (run only with ``LOGITCACHE_ALLOW_PIPE=1``, see `logitcache.data.tar.open_url`). Labels are
read from each sample's ``.cls`` member; a manifest with ``label_key`` (e.g. ``"meta.label"``) reads them from
that key path in the ``.json`` member instead: such a manifest is version 2 and its fingerprint covers the
``label_key``; every other manifest stays version 1, with the fingerprint it always had.

Reading checks cheap facts per shard (`ShardCheck`: size at open, key count and key digest at the end);
`verify_shards` also hashes every file. Both report `ShardChangedError`, naming the shard and what differs.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from logitcache.cache.schema import MAX_MANIFEST_BYTES
from logitcache.data.tar import is_pipe, open_url
from logitcache.errors import ManifestError, ShardChangedError
from logitcache.runtime.atomic import write_atomic
from logitcache.runtime.bounded import check_length, read_url_bounded

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "logitcache-manifest"
MANIFEST_VERSION = 1
#: version 2 = version 1 + ``label_key`` (labels in a ``.json`` member); only manifests that use it are written
#: as version 2, so version-1 manifests (and their fingerprints) stay as they were, and older readers refuse a
#: version-2 manifest instead of reading the wrong labels
MANIFEST_VERSIONS = (1, 2)


class KeysDigest:
    """sha256 over a shard's keys in order, each UTF-8 encoded and followed by ``\\n``; counts them too."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.count = 0

    def update(self, key: str) -> None:
        self._h.update(key.encode("utf-8") + b"\n")
        self.count += 1

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def keys_digest(keys: Iterable[str]) -> str:
    d = KeysDigest()
    for k in keys:
        d.update(k)
    return d.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """One shard's entry in the manifest."""

    name: str  # relative to the manifest's directory (or an absolute path/URL)
    size: int  # bytes
    sha256: str  # of the whole file
    num_samples: int  # every key, also ones later skipped as corrupt
    keys_digest: str  # `KeysDigest` over the keys in order
    first_index: int  # global index of the shard's first sample

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "size": self.size, "sha256": self.sha256, "num_samples": self.num_samples,
            "keys_digest": self.keys_digest, "first_index": self.first_index,
        }


@dataclass(frozen=True)
class Manifest:
    """The dataset: its shards in order and its class names. ``base_url`` (where the manifest was loaded from)
    is not part of the dataset's identity."""

    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...]
    base_url: str | None = field(default=None, compare=False)
    #: where each sample's label is: None = the ``.cls`` member; ``"a.b"`` = key path into the ``.json`` member
    label_key: str | None = None
    #: the view recipe a converter knows suits this data ({"name", "image_size"}; e.g. Fashion-MNIST: small,
    #: 28 px); a hint for commands given neither a cache nor --recipe, not part of the data's identity
    default_recipe: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        expected = 0
        for i, s in enumerate(self.shards):
            if s.first_index != expected:
                raise ManifestError(f"shard {i} ({s.name}) has first_index {s.first_index}, expected {expected}")
            if s.num_samples < 0 or s.size < 0:
                raise ManifestError(f"shard {i} ({s.name}) has a negative size or sample count")
            expected += s.num_samples
        if not self.class_names:
            raise ManifestError("a manifest needs at least one class name")
        if self.label_key is not None and not all(self.label_key.split(".")):
            raise ManifestError(f"label_key {self.label_key!r} is not a dotted key path like 'label' or 'meta.label'")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over a canonical JSON (sorted keys, no spaces, ASCII) of the format, class names and shards."""
        return hashlib.sha256(_canonical(self._identity()).encode("ascii")).hexdigest()

    def _identity(self) -> dict[str, Any]:
        identity = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "num_classes": self.num_classes,
            "class_names": list(self.class_names), "shards": [s.to_json() for s in self.shards],
        }
        if self.label_key is not None:
            identity.update(version=2, label_key=self.label_key)
        return identity

    def shard_url(self, i: int) -> str:
        """The full path/URL of shard ``i``: its name joined to the manifest's directory unless absolute."""
        name = self.shards[i].name
        if self.base_url is None or "://" in name or os.path.isabs(name) or name.startswith("pipe:"):
            return name
        return self.base_url.rstrip("/") + "/" + name

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, offset)`` of a global index."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"global index {index} outside [0, {self.num_samples})")
        starts = [s.first_index for s in self.shards]
        shard = bisect.bisect_right(starts, index) - 1
        while self.shards[shard].num_samples == 0 or index >= starts[shard] + self.shards[shard].num_samples:
            shard += 1  # (empty shards share a first_index with their successor)
        return shard, index - starts[shard]

    def to_json(self) -> dict[str, Any]:
        d = {**self._identity(), "fingerprint": self.fingerprint}
        if self.default_recipe is not None:
            d["default_recipe"] = dict(self.default_recipe)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], base_url: str | None = None, *, where: str = "manifest") -> Manifest:
        """Parsed and checked before anything is read or allocated: every field's type, and each shard's
        declared sample count against its declared byte size (a sample takes at least one 512-byte tar header,
        so ``num_samples * 512 <= size``); the real file size is checked when the shard is opened."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: not a logitcache manifest (not a JSON object)")
        if d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: not a logitcache manifest (format {d.get('format')!r})")
        if d.get("version") not in MANIFEST_VERSIONS:
            raise ManifestError(f"{where}: manifest version {d.get('version')} is not supported "
                                f"(this logitcache reads versions {', '.join(map(str, MANIFEST_VERSIONS))})")
        if (d.get("version") == 2) != ("label_key" in d):
            raise ManifestError(f"{where}: a version-2 manifest has a label_key, a version-1 manifest none")
        raw_shards, names = d.get("shards"), d.get("class_names")
        if not isinstance(raw_shards, list):
            raise ManifestError(f"{where}: 'shards' must be a list, got {_short(raw_shards)}")
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise ManifestError(f"{where}: 'class_names' must be a list of strings, got {_short(names)}")
        shards = []
        for i, s in enumerate(raw_shards):
            if not isinstance(s, dict):
                raise ManifestError(f"{where}: shard {i} is not a JSON object")
            ints = {}
            for key in ("size", "num_samples", "first_index"):
                v = s.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ManifestError(f"{where}: shard {i} ({s.get('name')!r}): {key!r} must be an integer "
                                        f">= 0, got {_short(v)}")
                ints[key] = v
            for key in ("name", "sha256", "keys_digest"):
                if not isinstance(s.get(key), str):
                    raise ManifestError(f"{where}: shard {i}: {key!r} must be a string, got {_short(s.get(key))}")
            if ints["num_samples"] * TAR_BLOCK > ints["size"]:
                raise ManifestError(
                    f"{where}: shard {i} ({s['name']}) declares {ints['num_samples']} samples in {ints['size']} "
                    f"bytes; a sample takes at least {TAR_BLOCK} bytes (its tar header): refusing the manifest")
            shards.append(ShardInfo(s["name"], ints["size"], s["sha256"], ints["num_samples"], s["keys_digest"],
                                    ints["first_index"]))
        label_key = d.get("label_key")
        if label_key is not None and not isinstance(label_key, str):
            raise ManifestError(f"{where}: 'label_key' must be a string or null, got {_short(label_key)}")
        manifest = cls(tuple(shards), tuple(names), base_url, label_key, default_recipe=_default_recipe(d, where))
        n = d.get("num_classes", manifest.num_classes)
        if isinstance(n, bool) or not isinstance(n, int):
            raise ManifestError(f"{where}: 'num_classes' must be an integer, got {_short(n)}")
        if n != manifest.num_classes:
            raise ManifestError(f"{where}: num_classes {n} != {manifest.num_classes} class names")
        if "fingerprint" in d and d["fingerprint"] != manifest.fingerprint:
            raise ManifestError(f"{where}: recorded fingerprint {d['fingerprint']} != {manifest.fingerprint} "
                                "computed from its contents (the manifest was edited)")
        return manifest

    def save(self, out: str | os.PathLike) -> str:
        """Write ``manifest.json`` into directory ``out`` (or to ``out`` if it ends in .json); return its URL."""
        url = manifest_url(out)
        data = (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")
        check_length(len(data), MAX_MANIFEST_BYTES, name=url, what="manifest (no reader would open it)",
                     error=ManifestError)
        _write_atomic(url, data)
        return url


#: a tar member's header; every sample has at least one member
TAR_BLOCK = 512


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _default_recipe(d: dict[str, Any], where: str) -> dict[str, Any] | None:
    r = d.get("default_recipe")
    if r is None:
        return None
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not (
            r.get("image_size") is None or (isinstance(r["image_size"], int) and 0 < r["image_size"] <= 65536)):
        raise ManifestError(f"{where}: 'default_recipe' must be {{\"name\": str, \"image_size\": int}}, got "
                            f"{_short(r)}")
    return {"name": r["name"], "image_size": r.get("image_size")}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def manifest_url(path_or_url: str | os.PathLike) -> str:
    s = os.fspath(path_or_url)
    if "://" not in s:
        s = os.path.abspath(s)
    return s if s.endswith(".json") else s.rstrip("/") + "/" + MANIFEST_NAME


def _write_atomic(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    write_atomic(path, data, fs)


def load_manifest(path_or_url: str | os.PathLike | Manifest) -> Manifest:
    """The manifest at a ``manifest.json`` path, or in a directory / fsspec URL prefix holding one."""
    if isinstance(path_or_url, Manifest):
        return path_or_url
    url = manifest_url(path_or_url)
    try:  # its size checked before it is read: `schema.MAX_MANIFEST_BYTES`
        d = json.loads(read_url_bounded(url, MAX_MANIFEST_BYTES, what="manifest", error=ManifestError))
    except FileNotFoundError as e:
        raise ManifestError(f"{url}: no manifest here (write one with `logitcache shards scan DIR`)") from e
    except OSError as e:
        raise ManifestError(f"{url}: cannot read the manifest ({e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url}: not valid JSON ({e})") from e
    return Manifest.from_json(d, base_url=url.rsplit("/", 1)[0], where=url)


# ------------------------------------------------------------------ checking shards against the manifest
class ShardCheck:
    """The cheap per-shard check used while reading: size at open, then key count and key digest at the end."""

    def __init__(self, info: ShardInfo, url: str):
        self.info, self.url = info, url
        self.keys = KeysDigest()

    def check_size(self, size: int | None) -> None:
        if size is not None and size != self.info.size:
            raise ShardChangedError(f"{self.url}: size {size} bytes, but the manifest says {self.info.size} "
                                    "(truncated, re-encoded or replaced?)")

    def add_key(self, key: str) -> None:
        self.keys.update(key)
        if self.keys.count > self.info.num_samples:
            raise ShardChangedError(f"{self.url}:{key}: more samples than the {self.info.num_samples} "
                                    "the manifest lists")

    def finish(self) -> None:
        if self.keys.count != self.info.num_samples:
            raise ShardChangedError(f"{self.url}: {self.keys.count} samples, but the manifest says "
                                    f"{self.info.num_samples} (truncated or replaced?)")
        if self.keys.hexdigest() != self.info.keys_digest:
            raise ShardChangedError(f"{self.url}: its keys differ from the manifest's (keys digest "
                                    f"{self.keys.hexdigest()[:16]}… != {self.info.keys_digest[:16]}…)")


def file_size(url: str) -> int | None:
    """Size in bytes via fsspec ``info`` (None where the filesystem does not say, and for ``pipe:`` URLs, whose
    bytes are counted as they are read); missing -> ShardChangedError."""
    if is_pipe(url):
        return None
    fs, path = fsspec.core.url_to_fs(url)
    try:
        size = fs.info(path).get("size")
    except FileNotFoundError as e:
        raise ShardChangedError(f"{url}: shard is missing") from e
    return None if size is None else int(size)


def verify_shards(manifest: Manifest, shards: Sequence[int] | None = None) -> list[ShardChangedError]:
    """Full check of the shard files: size, then sha256 of every byte. Returns the problems (empty: all good)."""
    problems: list[ShardChangedError] = []
    for i in range(len(manifest.shards)) if shards is None else shards:
        info, url = manifest.shards[i], manifest.shard_url(i)
        try:
            ShardCheck(info, url).check_size(file_size(url))
            h = hashlib.sha256()
            size = 0
            with open_url(url) as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    size += len(block)
            ShardCheck(info, url).check_size(size)
            if h.hexdigest() != info.sha256:
                raise ShardChangedError(f"{url}: sha256 {h.hexdigest()[:16]}… != the manifest's "
                                        f"{info.sha256[:16]}… (same size, other bytes)")
        except ShardChangedError as e:
            problems.append(e)
    return problems


