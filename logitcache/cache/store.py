"""Opening a cache store safely and reading its plain objects.

Everything a cache holds is read through here: `ObjectStore` (bytes by key through fsspec, keys that cannot
leave the store's root), `open_zarr_root` (zarr v3 only, never consolidated metadata), the check of each array's
``zarr.json`` against the schema before zarr parses it (`check_array_metadata`), the root and group metadata
read, type-checked and held to the format's limits before zarr parses them (`load_root_meta`, `load_group_meta`:
a truncated or mistyped zarr.json is a `CacheMetadataError` naming it, a declared 10^12 rows is refused before
anything is allocated), the per-run records of concurrent dumps, group listing and unit markers. Every JSON
object is read with its size cap from `schema` (`ObjectStore.get`'s ``max_bytes``: `ZARR_JSON`, `RUN_RECORD`,
`MARKER`, `UNIT_INDEX`, `MANIFEST`), so an oversized one is refused, naming it, before it is read.
Opening a cache never executes code: metadata is JSON and only the schema's codecs are accepted."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, RootMeta, UnitMarker
from logitcache.errors import CacheError, CacheMetadataError
from logitcache.runtime.atomic import write_atomic
from logitcache.runtime.bounded import read_bounded, too_large


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

    def get(self, key: str, *, fresh: bool = False, max_bytes: int | None = None, what: str = "metadata object"
            ) -> bytes | None:
        """The object's bytes, None when it does not exist. ``fresh``: forget what the filesystem cached about
        the path first (an object-store filesystem answers "not found" from a listing it cached earlier).
        ``max_bytes``: a bigger object (a ``what``) is a `CacheMetadataError` naming it, raised before it is read
        (`runtime.bounded.read_bounded`); every JSON object is read with its cap from `schema`."""
        path = self.path(key)
        if fresh:
            self.fs.invalidate_cache(path)
        return self._read(key, path, max_bytes, what)

    def _read(self, key: str, path: str, max_bytes: int | None, what: str) -> bytes | None:
        """One object's bytes (None: absent), with `get`'s cap; `get_many` reads local objects through it too."""
        try:
            if max_bytes is None:
                return self.fs.cat_file(path)
            return read_bounded(self.fs, path, max_bytes, name=f"{self.url}: {key}", what=what,
                                error=CacheMetadataError)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """At most ``length`` bytes of the object from ``offset`` (fewer when it is shorter; one ranged GET on object
        stores), None when it does not exist. Format 2's packs are read one unit at a time through this."""
        path = self.path(key)
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
            return self.fs.cat_file(path, start=offset, end=offset + length)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception:  # S3 answers a range starting past the end with an error (416), not empty bytes
            if not self.is_local and offset >= self.fs.size(path):
                return b""
            raise

    def get_many(self, keys: list[str], *, max_bytes: int | None = None, what: str = "metadata object"
                 ) -> dict[str, bytes]:
        """The objects that exist among ``keys``, fetched concurrently on object stores (s3fs batches the GETs:
        one round trip per batch instead of one per object, which matters for thousands of unit markers).
        ``max_bytes``: as `get`, each object read with one ranged GET of at most ``max_bytes + 1`` bytes."""
        paths = {self.path(k): k for k in keys}
        if not paths:
            return {}
        if max_bytes is not None and self.is_local:
            out = {k: self._read(k, p, max_bytes, what) for p, k in paths.items()}
            return {k: v for k, v in out.items() if v is not None}
        if max_bytes is None:
            got = self.fs.cat(list(paths), on_error="omit")
        else:
            ranged = self.fs.cat_ranges(list(paths), 0, max_bytes + 1, on_error="return")
            got = {}
            for p, data in zip(paths, ranged, strict=True):
                if isinstance(data, (FileNotFoundError, NotADirectoryError)):
                    continue
                if isinstance(data, Exception):  # e.g. an empty object's unsatisfiable range: read it alone
                    data = self._read(paths[p], p, max_bytes, what)
                    if data is None:
                        continue
                if len(data) > max_bytes:
                    raise CacheMetadataError(too_large(f"{self.url}: {paths[p]}", None, max_bytes, what))
                got[p] = data
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

    def delete_many(self, keys: list[str]) -> None:
        """Delete the objects that exist among ``keys`` (object stores: batched requests)."""
        paths = [self.path(k) for k in keys]
        if not paths:
            return
        if self.is_local:
            for p in paths:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:  # some were gone already: one by one
            for k in keys:
                self.delete(k)
        for p in paths:
            self.fs.invalidate_cache(p)

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

    def fsync(self, keys: list[str]) -> None:
        """Make these objects durable (local disks: fsync each file and its directory; object stores: a PUT
        is durable when it returns). Called on a unit's chunks before its marker is written, so a power cut
        cannot leave a finished marker over a stale chunk."""
        if not self.is_local:
            return
        dirs = set()
        for key in keys:
            path = self.path(key)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(path))
        for d in sorted(dirs):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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


@contextlib.contextmanager
def numcodecs_quietly():
    """Around zarr calls that build format 2's codecs (opening or creating the ``rows`` array, writing a chunk):
    zarr warns on every construction of a numcodecs codec that it is "not in the Zarr version 3 specification".
    FORMAT.md names them on purpose and `schema` checks their settings, so the warning would only repeat on
    every open — and raise in a caller that turns warnings into errors. Local: other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
        yield


def _open_zarr_root(url: str, storage_options: dict[str, Any] | None, *, mode: str, **kwargs):
    """The cache's root zarr group: zarr v3 only (v2 metadata can name pickle codecs), and never through
    consolidated metadata (it would let the root's zarr.json override the arrays' checked metadata)."""
    import zarr

    read_only = mode == "r"
    store = _zarr_store(url, storage_options, read_only=read_only)
    if mode in ("r", "r+"):
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)
    return zarr.open_group(store, mode=mode, zarr_format=3, **kwargs)

def check_array_metadata(objects: ObjectStore, group: str, meta: GroupMeta, root: RootMeta | None,
                         url: str) -> None:
    """Every array's zarr.json passes `schema.array_metadata_problems` (`CacheMetadataError` naming it)."""
    for spec in schema.group_arrays(meta):
        key = f"{group}/{spec.name}/zarr.json"
        d = read_json_object(objects, key, missing=CacheMetadataError(
            f"{url}: array {group}/{spec.name} is missing ({key} not found)"))
        problems = schema.array_metadata_problems(spec, d, meta, root)
        if problems:
            raise CacheMetadataError(f"{url}: refusing array {group}/{spec.name}: " + "; ".join(problems)
                                     + f" (metadata {key})")


def _checked_arrays(zgroup, objects: ObjectStore, group: str, meta: GroupMeta, url: str,
                    root: RootMeta | None = None) -> dict[str, Any]:
    """The group's arrays, each opened only after its zarr.json passed `schema.array_metadata_problems`."""
    check_array_metadata(objects, group, meta, root, url)
    return {spec.name: zgroup[spec.name] for spec in schema.group_arrays(meta)}


#: the caps and names of the JSON objects of a cache, read with `ObjectStore.get`'s ``max_bytes`` (`schema`'s)
ZARR_JSON = {"max_bytes": schema.MAX_METADATA_JSON_BYTES, "what": "zarr.json"}
RUN_RECORD = {"max_bytes": schema.MAX_METADATA_JSON_BYTES, "what": "run record"}
MARKER = {"max_bytes": schema.MAX_MARKER_BYTES, "what": "unit marker"}
UNIT_INDEX = {"max_bytes": schema.MAX_UNIT_INDEX_BYTES, "what": "unit index"}
MANIFEST = {"max_bytes": schema.MAX_MANIFEST_BYTES, "what": "dataset manifest"}


def read_json_object(objects: ObjectStore, key: str, cap: dict[str, Any] | None = None, *,
                     missing: Exception | None = None) -> Any:
    """A metadata object parsed as JSON, in one read; over its ``cap`` (default `ZARR_JSON`) or invalid ->
    `CacheMetadataError` naming it; missing -> ``missing`` (default a `CacheMetadataError` naming it)."""
    data = objects.get(key, **(cap or ZARR_JSON))
    if data is None:
        raise missing or CacheMetadataError(f"{objects.url}: {key} is missing")
    return parse_json_object(objects, key, data)


def parse_json_object(objects: ObjectStore, key: str, data: bytes) -> Any:
    """``data``, the object ``key`` already read, parsed as JSON; invalid -> `CacheMetadataError` naming it."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheMetadataError(f"{objects.url}: {key} is not valid JSON ({e})") from None


def load_root_meta(objects: ObjectStore) -> RootMeta:
    """The root metadata, read and checked by us before zarr parses anything (types, limits, version)."""
    url = objects.url
    d = read_json_object(objects, "zarr.json",
                         missing=CacheError(f"no cache at {url} (no zarr.json: not a zarr v3 store)"))
    if not isinstance(d, dict) or d.get("zarr_format") != 3 or d.get("node_type") != "group":
        raise CacheMetadataError(f"{url}: zarr.json is not a zarr v3 group's metadata")
    attrs = d.get("attributes", {}).get(schema.ATTRS_KEY) if isinstance(d.get("attributes"), dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != schema.FORMAT_NAME:
        raise CacheError(f"{url} is not a logitcache cache (no '{schema.ATTRS_KEY}' root attributes in zarr.json)")
    root = RootMeta.from_json(attrs, where=f"{url}: zarr.json attributes")
    if root.format_version[0] not in schema.READABLE_MAJORS:
        raise CacheError(
            f"{url} has format version {list(root.format_version)}; this logitcache reads "
            + " and ".join(f"{m}.x" for m in schema.READABLE_MAJORS)
        )
    return root


class _GroupBeingCreated(CacheError):
    """A group's zarr.json exists but not its arrays: another process is creating it (retried, then raised)."""


#: how long `create_or_open` waits for a concurrent process creating the same cache or group
CREATE_RACE_SECONDS = 30.0


def load_runs(objects: ObjectStore, group: str) -> list[dict[str, Any]]:
    """The dump runs recorded in ``<group>/runs/`` (oldest first), each checked: shards (list or null), epochs,
    provenance. A malformed run object is a metadata problem (`CacheMetadataError` naming it)."""
    keys = [k for k in objects.list(f"{group}/{schema.RUNS_DIR}") if k.endswith(".json")]
    out = []
    for key, data in sorted(objects.get_many(keys, **RUN_RECORD).items()):
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CacheMetadataError(f"{objects.url}: run record {key} is not valid JSON ({e})") from None
        where = f"{objects.url}: run record {key}"
        if not isinstance(d, dict) or not isinstance(d.get("provenance"), dict):
            raise CacheMetadataError(f"{where}: not a run record (a JSON object with 'provenance')")
        shards = schema._list(d, "shards", where, int, max_len=schema.MAX_SHARDS, optional=True)
        schema._int(d, "epochs", where, 1, schema.MAX_EPOCHS)
        if shards is not None and any(s < 0 for s in shards):
            raise CacheMetadataError(f"{where}: 'shards' must be shard indices")
        out.append(d)
    return out


def load_group_meta(objects: ObjectStore, group: str) -> GroupMeta:
    """A teacher group's metadata, read and checked by us before zarr parses anything; its ``shards`` are the
    union of the group's own and every recorded run's (`load_runs`), its provenance the runs' in order."""
    meta = _load_group_attrs(objects, group)
    runs = load_runs(objects, group)
    if not runs:
        return meta
    shards = meta.shards
    for r in runs:
        shards = None if shards is None or r["shards"] is None else tuple(sorted({*shards, *r["shards"]}))
    return dataclasses.replace(meta, shards=shards,
                               provenance=(*meta.provenance, *(r["provenance"] for r in runs)))


def _load_group_attrs(objects: ObjectStore, group: str) -> GroupMeta:
    """A teacher group's own metadata, read and checked by us before zarr parses anything."""
    key = f"{group}/zarr.json"
    d = read_json_object(objects, key)
    if not isinstance(d, dict) or d.get("zarr_format") != 3 or d.get("node_type") != "group":
        raise CacheMetadataError(f"{objects.url}: {key} is not a zarr v3 group's metadata")
    attrs = d.get("attributes", {}).get(schema.ATTRS_KEY) if isinstance(d.get("attributes"), dict) else None
    if attrs is None:
        raise CacheMetadataError(f"{objects.url}: {key} has no '{schema.ATTRS_KEY}' attributes")
    return GroupMeta.from_json(attrs, where=f"{objects.url}: group '{group}' ({key})")


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


def format_shards(shards) -> str:
    """Shard indices as a --shards selection: [0, 1, 2, 5] -> '0-2,5'."""
    out, run = [], []
    for s in sorted(shards):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


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
        data = objects.get(f"{key}/zarr.json", **ZARR_JSON)
        if data is None:
            continue
        d = parse_json_object(objects, f"{key}/zarr.json", data)
        if isinstance(d, dict) and d.get("node_type") == "group":
            out.append(key)
        elif not isinstance(d, dict):
            raise CacheMetadataError(f"{objects.url}: {key}/zarr.json is not a JSON object")
    return sorted(out)


def read_marker_objects(objects: ObjectStore, group: str) -> dict[tuple[int, int], UnitMarker]:
    """The units that have a marker object (not those a sealed unit index certifies: `read_markers`)."""
    out = {}
    # temp files of an interrupted atomic write do not end in .json; a marker deleted since the listing is absent
    keys = [k for k in objects.list(f"{group}/{schema.UNITS_DIR}") if k.endswith(".json")]
    for key, data in sorted(objects.get_many(keys, **MARKER).items()):
        m = UnitMarker.from_bytes(data, where=key)
        if schema.unit_marker_key(group, m.epoch, m.shard) != key:
            # a marker copied or edited onto another unit would certify chunks it never hashed
            raise CacheError(f"unit marker {key} says it is unit (epoch {m.epoch}, shard {m.shard}); refusing it")
        out[(m.epoch, m.shard)] = m
    return out


@dataclasses.dataclass(frozen=True)
class UnitIndex:
    """One unit index object: its key, epoch, pack id (None: an unpacked index, `schema.unit_index_key`) and
    entries (shard -> record)."""

    key: str
    epoch: int
    pack_id: str | None
    entries: dict[int, UnitMarker]


def read_index_objects(objects: ObjectStore, group: str, epoch: int | None = None) -> list[UnitIndex]:
    """The group's unit index objects (of ``epoch`` only, when given), parsed, in key order. Objects named
    otherwise in the folder are not indexes; one deleted since the listing (a seal superseding it) is skipped."""
    out = []
    for key in objects.list(f"{group}/{schema.UNIT_INDEX_DIR}"):
        name = schema.unit_index_name(key)
        if name is None or (epoch is not None and name[0] != epoch):
            continue
        data = objects.get(key, **UNIT_INDEX)
        if data is not None:
            out.append(UnitIndex(key, name[0], name[1], _parse_index(data, name[0], key, name[1])))
    return out


def merge_indexes(indexes: list[UnitIndex], url: str) -> dict[tuple[int, int], UnitMarker]:
    """(epoch, shard) -> record over several index objects. A unit two objects list (a seal that stopped before
    it deleted what its packs superseded, or two seals at once) must have the same record in both, else the
    cache is refused naming them; an entry in a pack is preferred, then the first object in key order."""
    out: dict[tuple[int, int], UnitMarker] = {}
    where: dict[tuple[int, int], str] = {}
    for ix in indexes:
        for shard, m in ix.entries.items():
            unit = (ix.epoch, shard)
            have = out.get(unit)
            if have is not None and have.unpacked() != m.unpacked():
                raise CacheMetadataError(
                    f"{url}: unit (epoch {ix.epoch}, shard {shard}) is recorded differently by unit indexes "
                    f"{where[unit]} and {ix.key}. Delete the wrong one (or both, to have `dump` redo the unit)")
            if have is None or (have.pack is None and m.pack is not None):
                out[unit], where[unit] = m, ix.key
    return out


def read_unit_indexes(objects: ObjectStore, group: str) -> dict[tuple[int, int], UnitMarker]:
    """Every unit the group's unit indexes list (`merge_indexes`)."""
    return merge_indexes(read_index_objects(objects, group), objects.url)


def _parse_index(data: bytes, epoch: int, key: str, pack_id: str | None) -> dict[int, UnitMarker]:
    try:
        return schema.parse_unit_index(data, epoch, where=key, pack_id=pack_id)
    except CacheError as e:
        # a sealed index is the only record of its units: it is metadata, and a repair must not guess around it
        raise CacheMetadataError(f"{e}. Delete that object to have `dump` redo the units it listed "
                                 "(their chunks cannot be trusted without it)") from e


def read_markers(objects: ObjectStore, group: str) -> dict[tuple[int, int], UnitMarker]:
    """The finished units: those with a marker object and those a unit index lists (a sealed unit's marker is
    deleted once an index certifies it, FORMAT.md "Sealed units"). The markers are listed before the indexes
    are read: sealing writes an index before it deletes the markers it lists, so a marker gone since the
    listing is in an index read after it. Where both exist the marker wins (it is never older)."""
    return _finished(objects, group, read_marker_objects(objects, group))


def _finished(objects: ObjectStore, group: str, markers: dict[tuple[int, int], UnitMarker]):
    """The marker objects (read first) and the index entries: where a unit has both, its marker."""
    return {**read_unit_indexes(objects, group), **markers}


def read_marker(objects: ObjectStore, group: str, epoch: int, shard: int) -> UnitMarker | None:
    """One unit's record (one GET of its marker; when it has none, sealed or unfinished, the epoch's unit
    indexes: a listing and one GET each), None when the unit is unfinished."""
    key = schema.unit_marker_key(group, epoch, shard)
    data = objects.get(key, fresh=True, **MARKER)
    if data is None:
        return merge_indexes(read_index_objects(objects, group, epoch), objects.url).get((epoch, shard))
    m = UnitMarker.from_bytes(data, where=key)
    if (m.epoch, m.shard) != (epoch, shard):
        raise CacheError(f"unit marker {key} says it is unit (epoch {m.epoch}, shard {m.shard}); refusing it")
    return m


def read_epoch_markers(objects: ObjectStore, group: str, epoch: int) -> dict[int, UnitMarker]:
    """shard -> record of cached epoch ``epoch``'s finished units: from the epoch's unit indexes when the dump
    wrote them (a listing and one GET per index, one per pack in format 2; units finished since are found by
    `read_marker`), else from the markers themselves (a listing and one GET per unit of the epoch)."""
    indexes = read_index_objects(objects, group, epoch)
    if indexes:
        return {s: m for (_, s), m in merge_indexes(indexes, objects.url).items()}
    prefix = f"e{epoch:05d}-"
    keys = [k for k in objects.list(f"{group}/{schema.UNITS_DIR}")
            if k.rsplit("/", 1)[-1].startswith(prefix) and k.endswith(".json")]
    out = {}
    for k, data in sorted(objects.get_many(keys, **MARKER).items()):
        m = UnitMarker.from_bytes(data, where=k)
        if schema.unit_marker_key(group, m.epoch, m.shard) != k:
            raise CacheError(f"unit marker {k} says it is unit (epoch {m.epoch}, shard {m.shard}); refusing it")
        out[m.shard] = m
    return out


def write_unit_indexes(objects: ObjectStore, group: str) -> list[int]:
    """Format 1: write (or rewrite when stale) every epoch's unpacked unit index from the finished units, reading
    each back to check it; returns the epochs written. The markers stay the truth (format 2 seals its units
    instead: `cache.packs.seal_units`). One process calls this once all units it waited for are finished."""
    by_epoch: dict[int, list[UnitMarker]] = {}
    for (e, _), m in read_markers(objects, group).items():
        by_epoch.setdefault(e, []).append(m)
    written = []
    for e, units in sorted(by_epoch.items()):
        key, data = schema.unit_index_key(group, e), schema.unit_index_bytes(e, units)
        if len(data) > UNIT_INDEX["max_bytes"]:
            continue  # readers would refuse it: the epoch's markers are read one by one
        if objects.get(key, **UNIT_INDEX) != data:
            put_index(objects, key, e, None, data, units)
            written.append(e)
    return written


def put_index(objects: ObjectStore, key: str, epoch: int, pack_id: str | None, data: bytes,
              units: list[UnitMarker]) -> None:
    """Write a unit index, read it back (it must parse to ``units``) and make it durable."""
    objects.put(key, data)
    back = objects.get(key, **UNIT_INDEX)
    if back is None or schema.parse_unit_index(back, epoch, where=key, pack_id=pack_id) != {m.shard: m for m in units}:
        raise CacheError(f"{objects.url}: unit index {key} did not read back as written")
    objects.fsync([key])


def unfinish_units(objects: ObjectStore, group: str, units: list[tuple[int, int]]) -> None:
    """Make ``units`` unfinished, so a dump redoes them (`dump --repair`): first their entries leave every unit
    index that lists them (rewritten without them; an index left empty is deleted, with its pack), then their
    markers go. A packed unit's bytes stay in its pack until the dump seals the epoch again (it rewrites the
    epoch's packs). Run by one process, no dump running."""
    for e in sorted({e for e, _ in units}):
        gone = {s for ue, s in units if ue == e}
        for ix in read_index_objects(objects, group, e):
            if not gone & set(ix.entries):
                continue
            keep = [m for s, m in ix.entries.items() if s not in gone]
            if keep:
                put_index(objects, ix.key, e, ix.pack_id, schema.unit_index_bytes(e, keep), keep)
            else:
                objects.delete(ix.key)
                if ix.pack_id is not None:
                    objects.delete(schema.pack_key(group, e, ix.pack_id))
    objects.delete_many([schema.unit_marker_key(group, e, s) for e, s in units])


def unit_index_problems(objects: ObjectStore, group: str) -> list[str]:
    """Where the unit indexes disagree with the marker objects or with each other (`verify`): an entry whose
    record differs from its unit's marker or from another index's entry, or an index that does not parse. An
    entry without a marker is a sealed unit; an index may lack units finished after it was written."""
    problems = []
    markers = read_marker_objects(objects, group)
    seen: dict[tuple[int, int], tuple[str, UnitMarker]] = {}
    for key in objects.list(f"{group}/{schema.UNIT_INDEX_DIR}"):
        name = schema.unit_index_name(key)
        data = None if name is None else objects.get(key, **UNIT_INDEX)
        if data is None:
            continue
        try:
            entries = schema.parse_unit_index(data, name[0], where=key, pack_id=name[1])
        except CacheError as e:
            problems.append(str(e))
            continue
        for shard, m in sorted(entries.items()):
            unit = (name[0], shard)
            if unit in markers and markers[unit] != m.unpacked():
                problems.append(f"unit index {key}: unit (epoch {unit[0]}, shard {shard}) differs from its marker")
            if unit in seen and seen[unit][1].unpacked() != m.unpacked():
                problems.append(f"unit index {key}: unit (epoch {unit[0]}, shard {shard}) differs from its entry "
                                f"in {seen[unit][0]}")
            seen.setdefault(unit, (key, m))
    return problems
