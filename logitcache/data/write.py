"""Writing shards deterministically: samples in input order, members sorted, mtime/uid 0, GNU tar; each shard
under a temporary name then renamed, the manifest last (its presence means a complete dataset)."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec

from logitcache.data.manifest import KeysDigest, Manifest, ShardInfo
from logitcache.errors import (
    DataError,
    LogitcacheError,
)


# ------------------------------------------------------------------ writing shards
class _HashingWriter:
    def __init__(self, f):
        import hashlib

        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _tar_bytes(name: str, size: int) -> int:
    header = 512 * (1 + (len(name.encode()) > 100) * (1 + (len(name.encode()) + 511) // 512))  # GNU long names
    return header + (size + 511) // 512 * 512


def _check_key(key: str) -> None:
    base = key.rsplit("/", 1)[-1]
    if not key or "." in base or base.startswith(("/", ".")) or key.startswith("/") or ".." in key.split("/"):
        raise DataError(f"sample key {key!r} cannot name tar members (no dots in its last part, no leading '/')")


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
    ``max_bytes``. Output is deterministic: samples in input order, each sample's members in extension order,
    mtime 0, uid/gid 0, no user names, mode 0644, GNU format; the same samples give the same bytes. Each
    shard is written under a temporary name and renamed; the manifest is written last, so its presence means a
    complete dataset.
    """
    if samples_per_shard < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("samples_per_shard and max_bytes must be >= 1")
    out_s = os.fspath(out)
    if "://" not in out_s:
        out_s = os.path.abspath(out_s)
    out_s = out_s.rstrip("/")
    fs, out_path = fsspec.core.url_to_fs(out_s)
    if fs.exists(out_path + "/manifest.json") and not overwrite:
        raise LogitcacheError(f"{out_s} already holds a dataset (manifest.json); choose another --out or overwrite")
    fs.makedirs(out_path, exist_ok=True)

    infos: list[ShardInfo] = []
    seen_keys: set[str] = set()
    state: dict[str, Any] = {}

    def open_next():
        name = f"{prefix}-{len(infos):06d}.tar"
        f = fs.open(f"{out_path}/{name}.tmp", "wb")
        hw = _HashingWriter(f)
        tar = tarfile.open(fileobj=hw, mode="w|", format=tarfile.GNU_FORMAT)
        state.update(name=name, f=f, hw=hw, tar=tar, keys=KeysDigest(), bytes=1024)

    def close_current():
        state["tar"].close()
        state["f"].close()
        fs.mv(f"{out_path}/{state['name']}.tmp", f"{out_path}/{state['name']}")
        first = infos[-1].first_index + infos[-1].num_samples if infos else 0
        keys: KeysDigest = state["keys"]
        infos.append(ShardInfo(state["name"], state["hw"].size, state["hw"].sha.hexdigest(), keys.count,
                               keys.hexdigest(), first))
        state.clear()

    for key, parts in samples:
        _check_key(key)
        if key in seen_keys:
            raise DataError(f"duplicate sample key {key!r}: keys must be unique")
        seen_keys.add(key)
        members = [(f"{key}.{ext}", parts[ext]) for ext in sorted(parts)]
        if not members or any(not ext or "/" in ext for ext in parts):
            raise DataError(f"sample {key!r} has no parts or a bad extension: {sorted(parts)}")
        size = sum(_tar_bytes(n, len(d)) for n, d in members)
        if state and (state["keys"].count >= samples_per_shard
                      or (max_bytes is not None and state["bytes"] + size > max_bytes)):
            close_current()
        if not state:
            open_next()
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
            state["tar"].addfile(ti, io.BytesIO(data))
        state["keys"].update(key)
        state["bytes"] += size
    if state:
        close_current()
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


