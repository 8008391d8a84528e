"""`CacheWriter` and `CacheReader`: the only module that touches zarr. The format itself lives in `schema`.

Both work on a local path or any fsspec URL (``file://``, ``s3://`` through s3fs, ...). Arrays go through zarr;
the plain JSON objects (unit markers, the dataset manifest) through fsspec, written atomically on local disks
(temp file + rename) and by a single PUT on object stores.

Safety: opening a cache never executes code. Metadata is JSON; groups are opened as zarr v3 only (a zarr v2
store could name numcodecs' pickle codec) and without consolidated metadata; every array's ``zarr.json`` is
checked against the schema (dtype, shape, codecs from `schema.ALLOWED_CODECS`) before zarr parses it; group
names and object keys are single safe path components under the store's root, whatever the metadata says.

Faults: an `OSError` while writing (disk full, permission denied, a failing object store) becomes
`CacheWriteError` naming the unit and the object; a unit's marker is written last, so every unit finished
before stays valid and a rerun completes the rest.

Fork safety: zarr's sync API runs an asyncio loop on a background thread, and a DataLoader worker forked after
the parent touched zarr can hang on it. `CacheReader` therefore opens its store lazily, on first use, in
each process (it re-opens when it notices it runs in a new PID), and pickles without open handles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache import schema
from logitcache.atomic import write_atomic
from logitcache.errors import CacheError, CacheMismatchError, CacheWriteError
from logitcache.schema import ARRAYS, GroupMeta, RootMeta, UnitMarker


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
    for spec in ARRAYS:
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


# ------------------------------------------------------------------ the rows of one unit
@dataclass
class UnitRows:
    """The arrays of one (epoch, shard) unit, ``length`` rows (padding past a shard's length removed)."""

    topk_indices: np.ndarray  # (n, k) int
    topk_logprobs: np.ndarray  # (n, k) float16/32
    target_logprob: np.ndarray  # (n,) float32
    lse: np.ndarray  # (n, R) float32
    view_params: np.ndarray  # (n, P) int16

    def __len__(self) -> int:
        return self.topk_indices.shape[0]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in schema.ARRAY_NAMES}


# ------------------------------------------------------------------ writer
class CacheWriter:
    """Writes units of one teacher group. Create with `CacheWriter.create_or_open` (one process, e.g. rank 0),
    then `CacheWriter.open` in the other ranks once it exists. Each unit's chunks are written, read back and
    hashed, and its marker is written last."""

    def __init__(self, url: str, group: str, *, storage_options: dict[str, Any] | None = None):
        self.url, self.group = url, _check_group_name(group, url)
        self.objects = ObjectStore(url, storage_options)
        self._zroot = _open_zarr_root(url, storage_options, mode="r+")
        g = self._zroot[group]
        self.root_meta = RootMeta.from_json(self._zroot.attrs[schema.ATTRS_KEY])
        self.meta = GroupMeta.from_json(g.attrs[schema.ATTRS_KEY])
        _checked_arrays(g, self.objects, group, self.meta, url)
        # write_empty_chunks is a runtime option, not stored metadata: every writer must set it (CONTRACTS §3)
        self._arrays = {a.name: _open_array_for_write(g, a.name) for a in ARRAYS}

    @classmethod
    def open(cls, url: str, group: str, *, storage_options: dict[str, Any] | None = None) -> CacheWriter:
        return cls(url, group, storage_options=storage_options)

    @classmethod
    def create_or_open(
        cls,
        url: str,
        group: str,
        meta: GroupMeta,
        root: RootMeta,
        manifest_json: dict[str, Any],
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> CacheWriter:
        """Create the cache/group, or check an existing one matches and grow its epochs if asked for more.

        Refuses (`CacheMismatchError`) a cache made from other data or a group made with other settings, and
        names every setting that differs.
        """
        _check_group_name(group, url)
        try:
            return cls._create_or_open(url, group, meta, root, manifest_json, storage_options)
        except OSError as e:
            raise CacheWriteError(f"{url}: cannot create or extend teacher group '{group}': {_os_error(e)}") from e

    @classmethod
    def _create_or_open(cls, url, group, meta, root, manifest_json, storage_options) -> CacheWriter:
        try:
            zroot = _open_zarr_root(url, storage_options, mode="r+")
        except FileNotFoundError:
            zroot = None
        objects = ObjectStore(url, storage_options)
        if zroot is None:
            zroot = _open_zarr_root(url, storage_options, mode="w-", attributes={schema.ATTRS_KEY: root.to_json()})
            objects.put(schema.DATASET_MANIFEST_KEY, json.dumps(manifest_json, sort_keys=True, indent=1).encode())
        else:
            stored_root = read_root_meta(zroot, url)
            if stored_root.dataset_fingerprint != root.dataset_fingerprint:
                raise CacheMismatchError(
                    f"{url} was made from other data: dataset fingerprint {stored_root.dataset_fingerprint[:16]}… "
                    f"!= {root.dataset_fingerprint[:16]}… of the data given"
                )
        if group not in zroot:
            g = zroot.create_group(group, attributes={schema.ATTRS_KEY: meta.to_json()})
            for spec in ARRAYS:
                g.create_array(spec.name, **schema.zarr_array_kwargs(spec, meta, root))
        else:
            g = zroot[group]
            stored = GroupMeta.from_json(g.attrs[schema.ATTRS_KEY])
            diff = schema.settings_diff(stored.settings(), meta.settings())
            if diff:
                raise CacheMismatchError(
                    f"{url} group '{group}' was dumped with other settings; refusing to mix them:\n  "
                    + "\n  ".join(diff)
                )
            if meta.epochs > stored.epochs:  # more epochs later: grow axis 0, old units untouched
                for spec in ARRAYS:
                    arr = g[spec.name]
                    arr.resize((meta.epochs, *arr.shape[1:]))
            g.attrs[schema.ATTRS_KEY] = stored.merged(meta).to_json()  # epochs and shards only grow
        return cls(url, group, storage_options=storage_options)

    def add_provenance(self, entry: dict[str, Any]) -> None:
        """Append one run's provenance (single writer: rank 0)."""
        g = _open_zarr_root(self.url, self.objects.storage_options, mode="r+")[self.group]
        d = g.attrs[schema.ATTRS_KEY]
        d["provenance"] = [*d.get("provenance", []), entry]
        try:
            g.attrs[schema.ATTRS_KEY] = d
        except OSError as e:
            raise CacheWriteError(
                f"{self.url}: cannot record provenance in group '{self.group}': {_os_error(e)}"
            ) from e

    def finished_units(self) -> dict[tuple[int, int], UnitMarker]:
        return read_markers(self.objects, self.group)

    def write_unit(
        self,
        epoch: int,
        shard: int,
        offsets: np.ndarray,
        rows: UnitRows,
        length: int,
        stats: dict[str, float],
        skipped: tuple[int, ...] = (),
    ) -> UnitMarker:
        """Write one unit: rows go to ``offsets`` (positions in the shard), other rows stay zero padding."""
        L = self.root_meta.max_shard_len
        if length > L or (len(offsets) and int(np.max(offsets)) >= length):
            raise CacheError(f"unit (epoch {epoch}, shard {shard}): offsets/length exceed the shard length {length}")
        unit = f"unit (epoch {epoch}, shard {shard})"
        marker_key = schema.unit_marker_key(self.group, epoch, shard)
        key = marker_key
        try:
            # the marker is removed first so a crash mid-rewrite (repair) leaves the unit unfinished, not stale
            self.objects.delete(marker_key)
            hashes = {}
            for name, values in rows.as_dict().items():
                arr = self._arrays[name]
                key = schema.chunk_key(self.group, name, epoch, shard, arr.ndim)
                full = np.zeros((L, *arr.shape[3:]), dtype=arr.dtype)
                full[offsets] = values
                arr[epoch, shard] = full
                stored = self.objects.get(key)
                if stored is None:
                    raise CacheError(f"chunk {key} was not written (write_empty_chunks must be on)")
                hashes[name] = sha256_hex(stored)
            marker = UnitMarker(
                epoch, shard, int(length), hashes, {k: float(v) for k, v in stats.items()},
                tuple(int(s) for s in skipped),
            )
            key = marker_key
            self.objects.put(marker_key, marker.to_bytes())
        except OSError as e:
            raise CacheWriteError(
                f"{self.url}: writing {unit} of group '{self.group}' failed at object {key}: {_os_error(e)}. "
                f"The unit stays unfinished (no marker); units finished before are intact: free space / fix "
                f"permissions and rerun the dump to complete the rest"
            ) from e
        return marker


def _os_error(e: OSError) -> str:
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system"}.get(e.errno or -1)
    return f"{what} ({type(e).__name__}: {e})" if what else f"{type(e).__name__}: {e}"


def _open_array_for_write(group, name: str):
    # the runtime config that keeps all-zero chunks as stored objects (it is not stored in the metadata)
    return group[name].with_config({"write_empty_chunks": True})


# ------------------------------------------------------------------ reading helpers shared by reader/verify/info
def read_root_meta(zroot, url: str) -> RootMeta:
    d = zroot.attrs.get(schema.ATTRS_KEY)
    if not isinstance(d, dict) or d.get("format") != schema.FORMAT_NAME:
        raise CacheError(f"{url} is not a logitcache cache (no '{schema.ATTRS_KEY}' root attributes)")
    major = int(d["format_version"][0])
    if major != schema.FORMAT_VERSION[0]:
        raise CacheError(
            f"{url} has format version {d['format_version']}; this logitcache reads {schema.FORMAT_VERSION[0]}.x"
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


# ------------------------------------------------------------------ reader
class CacheReader:
    """Read-only access to one teacher group. Cheap to construct and to pickle; opens lazily per process."""

    def __init__(self, url: str, group: str | None = None, *, storage_options: dict[str, Any] | None = None):
        self.url, self._group_arg, self.storage_options = url, group, storage_options
        self._state: dict[str, Any] | None = None
        self._pid: int | None = None

    def __getstate__(self):
        return {
            "url": self.url,
            "_group_arg": self._group_arg,
            "storage_options": self.storage_options,
            "_state": None,
            "_pid": None,
        }

    # -- lazily opened state
    def _open(self) -> dict[str, Any]:
        if self._state is not None and self._pid == os.getpid():
            return self._state
        try:
            zroot = _open_zarr_root(self.url, self.storage_options, mode="r")
        except FileNotFoundError as e:
            raise CacheError(f"no cache at {self.url} (or not a zarr v3 store)") from e
        root = read_root_meta(zroot, self.url)
        objects = ObjectStore(self.url, self.storage_options)
        groups = list_groups(objects)
        group = self._group_arg if self._group_arg is None else _check_group_name(self._group_arg, self.url)
        if group is None:
            if len(groups) != 1:
                raise CacheError(f"{self.url} holds teacher groups {groups}: choose one with --group")
            group = groups[0]
        if group not in groups:
            raise CacheError(f"{self.url} has no teacher group '{group}' (it has {groups})")
        g = zroot[group]
        meta = GroupMeta.from_json(g.attrs[schema.ATTRS_KEY])
        self._state = {
            "root": root,
            "groups": groups,
            "group": group,
            "zgroup": g,
            "meta": meta,
            "arrays": _checked_arrays(g, objects, group, meta, self.url),
            "objects": objects,
            "markers": None,
            "first_index": None,
        }
        self._pid = os.getpid()
        return self._state

    @property
    def root_meta(self) -> RootMeta:
        return self._open()["root"]

    @property
    def meta(self) -> GroupMeta:
        return self._open()["meta"]

    @property
    def group(self) -> str:
        return self._open()["group"]

    @property
    def groups(self) -> list[str]:
        return self._open()["groups"]

    @property
    def objects(self) -> ObjectStore:
        return self._open()["objects"]

    def manifest_json(self) -> dict[str, Any]:
        data = self.objects.get(schema.DATASET_MANIFEST_KEY)
        if data is None:
            raise CacheError(f"{self.url} lacks {schema.DATASET_MANIFEST_KEY}")
        return json.loads(data)

    def markers(self, *, refresh: bool = False) -> dict[tuple[int, int], UnitMarker]:
        st = self._open()
        if st["markers"] is None or refresh:
            st["markers"] = read_markers(st["objects"], st["group"])
        return st["markers"]

    def cached_epoch(self, epoch: int) -> int:
        """The cached epoch whose views training epoch ``epoch`` replays (views cycle past the cached epochs)."""
        return epoch % self.meta.epochs

    def read_unit(self, epoch: int, shard: int) -> UnitRows:
        """All rows of a finished unit (its length from the marker). Unfinished units are an error."""
        st = self._open()
        marker = self.markers().get((epoch, shard))
        if marker is None:
            marker = self.markers(refresh=True).get((epoch, shard))
        if marker is None:
            raise CacheError(
                f"{self.url} group '{st['group']}': unit (epoch {epoch}, shard {shard}) is unfinished "
                f"(no marker); rerun the dump to complete it"
            )
        n = marker.length
        # the unit's chunks are independent objects: fetch them at once (one round trip, not five, on S3)
        if st.get("pool") is None:
            from concurrent.futures import ThreadPoolExecutor

            st["pool"] = ThreadPoolExecutor(len(st["arrays"]), thread_name_prefix="logitcache-read")
        futures = {name: st["pool"].submit(arr.__getitem__, (epoch, shard)) for name, arr in st["arrays"].items()}
        return UnitRows(**{name: np.asarray(f.result())[:n] for name, f in futures.items()})

    def topk_rows(self, rows: UnitRows, offsets, targets) -> Any:
        """A `TopKLogits` for the given offsets of a unit (targets come from the data)."""
        import torch

        from logitcache.topk import TopKLogits

        meta = self.meta
        offsets = np.asarray(offsets)
        lse = torch.from_numpy(rows.lse[offsets].astype(np.float32))
        lse1 = lse[:, meta.temperatures.index(1.0)]
        logprobs = torch.from_numpy(rows.topk_logprobs[offsets].astype(np.float32))
        return TopKLogits(
            indices=torch.from_numpy(rows.topk_indices[offsets].astype(np.int64)),
            logits=logprobs + lse1[:, None],
            target=torch.as_tensor(np.asarray(targets), dtype=torch.int64),
            target_logprob=torch.from_numpy(rows.target_logprob[offsets].astype(np.float32)),
            lse=lse,
            temperatures=meta.temperatures,
            num_classes=meta.num_classes,
        )

    def locate(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset) of global sample indices, from the shard lengths recorded in the cache."""
        st = self._open()
        if st["first_index"] is None:
            st["first_index"] = np.concatenate([[0], np.cumsum(st["root"].shard_lengths)])
        gi = np.asarray(global_indices, dtype=np.int64)
        first = st["first_index"]
        if gi.size and (gi.min() < 0 or gi.max() >= first[-1]):
            raise CacheError(f"global index out of range [0, {first[-1]}) for {self.url}")
        shard = np.searchsorted(first, gi, side="right") - 1
        return shard, gi - first[shard]

    def rows(self, epoch: int, global_indices, targets):
        """For a batch of global indices in training epoch ``epoch``: (`TopKLogits`, view-param array (N, P)).

        Reads each touched unit once; rows come back in the order asked for.
        """
        import torch

        from logitcache.topk import TopKLogits

        e = self.cached_epoch(epoch)
        shards, offsets = self.locate(global_indices)
        targets = np.asarray(targets)
        parts, views, order = [], [], []
        for s in np.unique(shards):
            sel = np.nonzero(shards == s)[0]
            unit = self.read_unit(e, int(s))
            parts.append(self.topk_rows(unit, offsets[sel], targets[sel]))
            views.append(unit.view_params[offsets[sel]])
            order.append(sel)
        perm = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable"))
        topk = TopKLogits.cat(parts)[perm]
        return topk, np.concatenate(views)[perm.numpy()]
