"""Writing shards: webdataset's `TarWriter`, set up for deterministic bytes, with the manifest written last.

Every shard is written by `ShardFile`: webdataset's ``TarWriter`` (no encoder: parts are bytes) into a hashing
writer, under a temporary name that is renamed when the shard is complete. The bytes are a function of the samples
alone: members in extension order, mtime 0, uid/gid 0, no user/group names, mode 0644, GNU tar format (long
names as GNU ``L`` members) — the same bytes as logitcache's own tar writer before it used webdataset's, so
re-converting a dataset keeps its fingerprint. Two ways to fill shards:

  * `write_shards`: a stream of samples, split into shards as it goes (one process);
  * `write_planned_shards`: shards planned up front (`plan_shards`, from sizes known before reading, e.g. file
    sizes), each written by one of ``workers`` processes; the bytes do not depend on the worker count.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import fsspec
from webdataset.writer import TarWriter

from logitcache.data.manifest import KeysDigest, Manifest, ShardInfo
from logitcache.errors import DataError, LogitcacheError


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def tar_writer(fileobj) -> TarWriter:
    """webdataset's `TarWriter` writing reproducible bytes (see the module docstring) to ``fileobj``."""
    writer = TarWriter(fileobj, encoder=False, mtime=0, user="", group="", mode=0o644)
    # webdataset 1.0 takes a format= argument but never hands it to tarfile (which then writes PAX headers);
    # the TarFile object reads its format when each member is added, so setting it here takes effect
    writer.tarstream.format = tarfile.GNU_FORMAT
    return writer


def tar_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a GNU-format tar: header (+ a GNU long-name member past 100 bytes) + padded data."""
    header = 512 * (1 + (len(name.encode()) > 100) * (1 + (len(name.encode()) + 511) // 512))
    return header + (size + 511) // 512 * 512


def check_key(key: str) -> None:
    base = key.rsplit("/", 1)[-1]
    if not key or "." in base or base.startswith(("/", ".")) or key.startswith("/") or ".." in key.split("/"):
        raise DataError(f"sample key {key!r} cannot name tar members (no dots in its last part, no leading '/')")


def _members(key: str, parts: dict[str, bytes]) -> dict[str, Any]:
    check_key(key)
    if not parts or any(not ext or "/" in ext or ext.startswith("_") for ext in parts):
        raise DataError(f"sample {key!r} has no parts or a bad extension: {sorted(parts)}")
    return {"__key__": key, **parts}


class ShardFile:
    """One shard being written: ``add(key, parts)`` then ``close()`` -> its `ShardInfo` (first_index 0)."""

    def __init__(self, fs, out_path: str, name: str):
        self.fs, self.out_path, self.name = fs, out_path, name
        self.f = fs.open(f"{out_path}/{name}.tmp", "wb")
        self.hw = _HashingWriter(self.f)
        self.tar = tar_writer(self.hw)
        self.keys = KeysDigest()
        self.bytes = 1024  # the end-of-archive blocks

    def add(self, key: str, parts: dict[str, bytes]) -> None:
        self.tar.write(_members(key, parts))
        self.keys.update(key)
        self.bytes += sum(tar_bytes(f"{key}.{ext}", len(data)) for ext, data in parts.items())

    def close(self, first_index: int = 0) -> ShardInfo:
        self.tar.close()
        self.f.close()
        self.fs.mv(f"{self.out_path}/{self.name}.tmp", f"{self.out_path}/{self.name}")
        return ShardInfo(self.name, self.hw.size, self.hw.sha.hexdigest(), self.keys.count, self.keys.hexdigest(),
                         first_index)


def _prepare_out(out: str | os.PathLike, overwrite: bool) -> tuple[str, Any, str]:
    out_s = os.fspath(out)
    if "://" not in out_s:
        out_s = os.path.abspath(out_s)
    out_s = out_s.rstrip("/")
    fs, out_path = fsspec.core.url_to_fs(out_s)
    if fs.exists(out_path + "/manifest.json") and not overwrite:
        raise LogitcacheError(f"{out_s} already holds a dataset (manifest.json); choose another --out or overwrite")
    fs.makedirs(out_path, exist_ok=True)
    return out_s, fs, out_path


def _finish(infos: list[ShardInfo], out_s: str, fs, out_path: str, class_names: Sequence[str], prefix: str,
            overwrite: bool, default_recipe: dict[str, Any] | None = None) -> Manifest:
    if not infos:
        raise DataError("no samples to write")
    if overwrite:  # shards of an earlier, longer run with this prefix would confuse `shards scan`
        ours = {i.name for i in infos}
        for p in fs.ls(out_path, detail=False):
            base = p.rsplit("/", 1)[-1]
            if re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", base) and base not in ours:
                fs.rm(p)
    manifest = Manifest(tuple(infos), tuple(str(c) for c in class_names), out_s, default_recipe=default_recipe)
    manifest.save(out_s)
    return manifest


def _chain(infos: list[ShardInfo]) -> list[ShardInfo]:
    out, first = [], 0
    for i in infos:
        out.append(ShardInfo(i.name, i.size, i.sha256, i.num_samples, i.keys_digest, first))
        first += i.num_samples
    return out


def write_shards(
    samples: Iterable[tuple[str, dict[str, bytes]]],
    out: str | os.PathLike,
    *,
    class_names: Sequence[str],
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    prefix: str = "shard",
    overwrite: bool = False,
    default_recipe: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``(key, {ext: bytes})`` samples into tar shards ``OUT/<prefix>-000000.tar``, ... and OUT/manifest.json.

    A shard closes after ``samples_per_shard`` samples or before a sample that would take it past
    ``max_bytes``. Output is deterministic (see the module docstring): the same samples give the same bytes.
    Each shard is written under a temporary name and renamed; the manifest is written last, so its presence
    means a complete dataset.
    """
    if samples_per_shard < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("samples_per_shard and max_bytes must be >= 1")
    out_s, fs, out_path = _prepare_out(out, overwrite)
    infos: list[ShardInfo] = []
    seen_keys: set[str] = set()
    shard: ShardFile | None = None
    for key, parts in samples:
        _members(key, parts)  # a bad key or part fails before anything is written
        if key in seen_keys:
            raise DataError(f"duplicate sample key {key!r}: keys must be unique")
        seen_keys.add(key)
        size = sum(tar_bytes(f"{key}.{ext}", len(d)) for ext, d in parts.items())
        if shard is not None and (shard.keys.count >= samples_per_shard
                                  or (max_bytes is not None and shard.bytes + size > max_bytes)):
            infos.append(shard.close())
            shard = None
        if shard is None:
            shard = ShardFile(fs, out_path, f"{prefix}-{len(infos):06d}.tar")
        shard.add(key, parts)
    if shard is not None:
        infos.append(shard.close())
    return _finish(_chain(infos), out_s, fs, out_path, class_names, prefix, overwrite, default_recipe)


def plan_shards(sizes: Sequence[int], *, samples_per_shard: int = 1000, max_bytes: int | None = None
                ) -> list[range]:
    """Split samples with these (estimated) tar sizes into shards by `write_shards`' rule: a shard closes after
    ``samples_per_shard`` samples or before a sample that would take it past ``max_bytes``."""
    if samples_per_shard < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("samples_per_shard and max_bytes must be >= 1")
    plan, start, used = [], 0, 1024
    for i, size in enumerate(sizes):
        if i > start and (i - start >= samples_per_shard or (max_bytes is not None and used + size > max_bytes)):
            plan.append(range(start, i))
            start, used = i, 1024
        used += size
    if start < len(sizes):
        plan.append(range(start, len(sizes)))
    return plan


def _write_planned_one(args) -> ShardInfo:
    out_s, name, load, items = args
    fs, out_path = fsspec.core.url_to_fs(out_s)
    shard = ShardFile(fs, out_path, name)
    for item in items:
        shard.add(*load(item))
    return shard.close()


def write_planned_shards(
    shards: Sequence[Sequence[Any]],
    load: Callable[[Any], tuple[str, dict[str, bytes]]],
    out: str | os.PathLike,
    *,
    class_names: Sequence[str],
    prefix: str = "shard",
    overwrite: bool = False,
    workers: int = 1,
) -> Manifest:
    """Write planned shards: ``shards[i]`` lists the items of shard i, ``load(item) -> (key, {ext: bytes})``
    reads one (a module-level function: it runs in ``workers`` processes). Keys must be unique (the caller
    knows them before reading). Same bytes and manifest for any ``workers``."""
    out_s, fs, out_path = _prepare_out(out, overwrite)
    tasks = [(out_s, f"{prefix}-{i:06d}.tar", load, list(items)) for i, items in enumerate(shards)]
    if workers <= 1 or len(tasks) <= 1:
        infos = [_write_planned_one(t) for t in tasks]
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            infos = list(pool.map(_write_planned_one, tasks))
    return _finish(_chain(infos), out_s, fs, out_path, class_names, prefix, overwrite)


__all__ = ["ShardFile", "check_key", "plan_shards", "tar_bytes", "tar_writer", "write_planned_shards",
           "write_shards"]
