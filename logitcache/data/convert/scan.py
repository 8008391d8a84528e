"""Manifests for shards someone else made: read each shard once (size, sha256, keys, largest label)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec

from logitcache.data.decode import parse_label
from logitcache.data.manifest import KeysDigest, Manifest, ShardInfo
from logitcache.data.tar import group_by_key, tar_members
from logitcache.errors import ManifestError, ShardFormatError


# ------------------------------------------------------------------ building a manifest by scanning shards
class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through and remembers the last 1 KiB."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.tail = f, hashlib.sha256(), 0, b""

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        self.tail = (self.tail + b)[-1024:]
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass(frozen=True)
class ShardScan:
    """The facts one pass over a shard file yields."""

    size: int
    sha256: str
    num_samples: int
    keys_digest: str
    max_label: int  # -1 when no sample has an integer .cls


def scan_shard(url: str) -> ShardScan:
    """Read a shard once: sha256 + size of the file, its keys (count, digest), the largest integer label.

    Broken tar structure (truncated tar, duplicate keys) raises `ShardFormatError` naming ``url:key``.
    """

    digest, max_label = KeysDigest(), -1
    with fsspec.open(url, "rb") as raw:
        f = _HashingReader(raw)
        last_key = None
        for sample in group_by_key(tar_members(f, url), url):
            last_key = sample["__key__"]
            digest.update(last_key)
            try:
                max_label = max(max_label, parse_label(sample.get("cls")))
            except ValueError:
                pass  # bad labels are reported when the sample is read, not here
        f.drain()
    if f.size and f.tail.count(0) != len(f.tail):
        # a tar ends with zero blocks; without them it was cut off exactly at a member boundary
        raise ShardFormatError(f"{url}:{last_key}: truncated tar (no end-of-archive blocks after this key)")
    return ShardScan(f.size, f.sha.hexdigest(), digest.count, digest.hexdigest(), max_label)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def list_shards(directory: str | os.PathLike) -> list[str]:
    """The ``*.tar`` files directly in ``directory`` (path or URL), in natural order (shard-2 before shard-10)."""
    d = os.fspath(directory)
    if "://" not in d:
        d = os.path.abspath(d)
    fs, path = fsspec.core.url_to_fs(d)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".tar")]
    return [d.rstrip("/") + "/" + n for n in sorted(names, key=_natural_key)]


def build_manifest(
    shard_urls: Sequence[str],
    class_names: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    base_url: str | None = None,
) -> Manifest:
    """Scan shards someone else made (in the order given) into a manifest.

    Class names default to ``"0".."C-1"`` with C = ``num_classes`` or, failing that, the largest label + 1.
    Shard names are stored relative to ``base_url`` (default: the first shard's directory) when under it.
    """
    if not shard_urls:
        raise ManifestError("no shards to build a manifest from")
    urls = [os.path.abspath(u) if "://" not in os.fspath(u) else os.fspath(u) for u in shard_urls]
    base = (base_url or urls[0].rsplit("/", 1)[0]).rstrip("/")
    if "://" not in base:
        base = os.path.abspath(base)
    infos, first, max_label = [], 0, -1
    for url in urls:
        scan = scan_shard(url)
        name = url[len(base) + 1 :] if url.startswith(base + "/") else url
        infos.append(ShardInfo(name, scan.size, scan.sha256, scan.num_samples, scan.keys_digest, first))
        first += scan.num_samples
        max_label = max(max_label, scan.max_label)
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if num_classes is not None and num_classes != len(names):
            raise ManifestError(f"{len(names)} class names given but num_classes={num_classes}")
    else:
        n = num_classes if num_classes is not None else max_label + 1
        if n < 1:
            raise ManifestError("no integer labels found: give the class names or the number of classes")
        names = tuple(str(i) for i in range(n))
    return Manifest(tuple(infos), names, base)




def read_class_names(path: str) -> list[str]:
    """Class names from a text file (one per line) or a JSON list (``*.json``); index = position."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(names, list):
            raise ManifestError(f"{path}: expected a JSON list of class names")
        return [str(n) for n in names]
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def scan_directory(directory: str, *, classes_file: str | None = None, num_classes: int | None = None,
                   force: bool = False) -> Manifest:
    """What ``logitcache shards scan`` does: write DIRECTORY/manifest.json for the ``*.tar`` shards in it
    (natural name order), reading each shard once. An existing manifest is kept unless ``force``."""
    target = directory.rstrip("/") + "/manifest.json"
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path) and not force:
        raise ManifestError(f"{target} exists; pass --force to replace it")
    names = read_class_names(classes_file) if classes_file is not None else None
    urls = list_shards(directory)
    if not urls:
        raise ManifestError(f"{directory}: no *.tar shards here")
    m = build_manifest(urls, names, num_classes=num_classes, base_url=directory)
    m.save(directory)
    return m
