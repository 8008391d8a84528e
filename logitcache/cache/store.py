"""Opening a cache store safely and reading its plain objects.

Everything a cache holds is read through here: `ObjectStore` (bytes by key through fsspec, keys that cannot
leave the store's root), `open_zarr_root` (zarr v3 only, never consolidated metadata), the check of each array's
``zarr.json`` against the schema before zarr parses it (`checked_arrays`), group listing and unit markers.
Opening a cache never executes code: metadata is JSON and only the schema's codecs are accepted."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, RootMeta, UnitMarker
from logitcache.errors import CacheError
from logitcache.runtime.atomic import write_atomic


# ------------------------------------------------------------------ plain objects next to the arrays
class ObjectStore:
    """Bytes by key under a root URL, through fsspec. Keys use '/' separators."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.url = url
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    def path(self, key: str) -> str:
        # keys come from our code and from metadata (group names): none may leave the store's root
        parts = key.split("/") if key else []
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise CacheError(f"unsafe object key {key!r} under {self.url}: refusing to touch it")
        return f"{self.root}/{key}" if key else self.root

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The objects that exist among ``keys``, fetched concurrently on object stores (s3fs batches the GETs:
        one round trip per batch instead of one per object, which matters for thousands of unit markers)."""
        paths = {self.path(k): k for k in keys}
        if not paths:
            return {}
        got = self.fs.cat(list(paths), on_error="omit")
        unexpected = sorted(set(got) - set(paths))
        if unexpected:  # a filesystem that renames paths: fail loudly rather than lose markers
            raise CacheError(f"{self.url}: the filesystem returned objects not asked for: {unexpected[:3]}")
        return {paths[p]: data for p, data in got.items()}

    def put(self, key: str, data: bytes) -> None:
        write_atomic(self.path(key), data, self.fs)  # a reader never sees half a marker

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root) of the objects directly under ``prefix``, listed afresh (object-store
        filesystems cache listings, and another process may have finished a unit since)."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(e[n:] if e.startswith(self.root + "/") else e for e in entries)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def size(self, key: str = "") -> int:
        """Total bytes of the objects under ``key`` (the whole store when empty)."""
        self.fs.invalidate_cache(self.path(key))
        try:
            return int(self.fs.du(self.path(key), total=True))
        except FileNotFoundError:
            return 0


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _open_zarr_root(url: str, storage_options: dict[str, Any] | None, *, mode: str, **kwargs):
    """The cache's root zarr group: zarr v3 only (v2 metadata can name pickle codecs), and never through
    consolidated metadata (it would let the root's zarr.json override the arrays' checked metadata)."""
    import zarr

    read_only = mode == "r"
    store = _zarr_store(url, storage_options, read_only=read_only)
    if mode in ("r", "r+"):
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)
    return zarr.open_group(store, mode=mode, zarr_format=3, **kwargs)


def _checked_arrays(zgroup, objects: ObjectStore, group: str, meta: GroupMeta, url: str) -> dict[str, Any]:
    """The group's arrays, each opened only after its zarr.json passed `schema.array_metadata_problems`."""
    out = {}
    for spec in schema.group_arrays(meta):
        key = f"{group}/{spec.name}/zarr.json"
        data = objects.get(key)
        if data is None:
            raise CacheError(f"{url}: array {group}/{spec.name} is missing ({key} not found)")
        try:
            d = json.loads(data)
        except ValueError as e:
            raise CacheError(f"{url}: {key} is not valid JSON ({e})") from e
        problems = schema.array_metadata_problems(spec, d, meta)
        if problems:
            raise CacheError(f"{url}: refusing array {group}/{spec.name}: " + "; ".join(problems))
        out[spec.name] = zgroup[spec.name]
    return out


def _check_group_name(group: str, url: str) -> str:
    try:
        return schema.validate_group_name(group)
    except ValueError as e:
        raise CacheError(f"{url}: {e}") from None


def _zarr_store(url: str, storage_options: dict[str, Any] | None, *, read_only: bool):
    import zarr.storage

    if "://" not in url or url.startswith("file://"):
        path = url[len("file://") :] if url.startswith("file://") else url
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _os_error(e: OSError) -> str:
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system"}.get(e.errno or -1)
    return f"{what} ({type(e).__name__}: {e})" if what else f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------ reading helpers shared by reader/verify/info
def read_root_meta(zroot, url: str) -> RootMeta:
    d = zroot.attrs.get(schema.ATTRS_KEY)
    if not isinstance(d, dict) or d.get("format") != schema.FORMAT_NAME:
        raise CacheError(f"{url} is not a logitcache cache (no '{schema.ATTRS_KEY}' root attributes)")
    major = int(d["format_version"][0])
    if major not in schema.READABLE_MAJORS:
        raise CacheError(
            f"{url} has format version {d['format_version']}; this logitcache reads "
            + " and ".join(f"{m}.x" for m in schema.READABLE_MAJORS)
        )
    return RootMeta.from_json(d)


def list_groups(objects: ObjectStore) -> list[str]:
    """Teacher groups of a cache: the child folders holding a zarr group (listed without zarr's member scan,
    which warns about the plain JSON objects next to the arrays)."""
    out = []
    for key in objects.list(""):
        if "/" in key or key in (".", ".."):
            raise CacheError(f"{objects.url} lists an object with an unsafe name {key!r}: refusing the store")
        if key.endswith(".json") or key.startswith("."):
            continue  # the root's own JSON objects (zarr.json, dataset_manifest.json), temp files
        meta = objects.get(f"{key}/zarr.json")
        if meta is not None and json.loads(meta).get("node_type") == "group":
            out.append(key)
    return sorted(out)


def read_markers(objects: ObjectStore, group: str) -> dict[tuple[int, int], UnitMarker]:
    out = {}
    # temp files of an interrupted atomic write do not end in .json; a marker deleted since the listing is absent
    keys = [k for k in objects.list(f"{group}/{schema.UNITS_DIR}") if k.endswith(".json")]
    for key, data in sorted(objects.get_many(keys).items()):
        m = UnitMarker.from_bytes(data, where=key)
        if schema.unit_marker_key(group, m.epoch, m.shard) != key:
            # a marker copied or edited onto another unit would certify chunks it never hashed
            raise CacheError(f"unit marker {key} says it is unit (epoch {m.epoch}, shard {m.shard}); refusing it")
        out[(m.epoch, m.shard)] = m
    return out


