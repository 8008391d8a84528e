"""`CacheWriter`: creates or extends a teacher group and writes units — each unit's chunks first (read back and
hashed), its completion marker last — so a crash leaves the unit unfinished, never half-certified.

Writes format 2 (one packed chunk per unit) for a group whose metadata names a codec, format 1 (five arrays)
otherwise; `encode_rows` turns a unit's `TopKLogits` + view params into what `write_unit` stores, in either.

Faults: an `OSError` while writing (disk full, permission denied, a failing object store) becomes
`CacheWriteError` naming the unit and the object; every unit finished before stays valid and a rerun completes
the rest. `write_empty_chunks` is a runtime option of zarr, not stored metadata: the writer sets it itself.

Durability: on local disks a unit's chunk files are fsync'd before its marker is written. Concurrency: each dump
run records its shards and provenance in its own object (`start_run`), never by rewriting the group's attributes,
so `dump --shards` runs on one group from several hosts keep each other's; creating the same cache or group at
once is retried until the other process has made it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, PackedRows, RootMeta, UnitMarker, UnitRows
from logitcache.cache.store import (
    CREATE_RACE_SECONDS,
    ZARR_JSON,
    ObjectStore,
    _check_group_name,
    _GroupBeingCreated,
    _open_zarr_root,
    _os_error,
    check_array_metadata,
    load_group_meta,
    load_root_meta,
    numcodecs_quietly,
    read_json_object,
    read_markers,
    sha256_hex,
)
from logitcache.errors import CacheError, CacheMismatchError, CacheWriteError
from logitcache.labels.codecs import encode_topk
from logitcache.labels.tails import prior_digest
from logitcache.labels.topk import TopKLogits


# ------------------------------------------------------------------ writer
class CacheWriter:
    """Writes units of one teacher group. Create with `CacheWriter.create_or_open` (one process, e.g. rank 0),
    then `CacheWriter.open` in the other ranks once it exists. Each unit's chunks are written, read back and
    hashed, and its marker is written last."""

    @numcodecs_quietly()
    def __init__(self, url: str, group: str, *, storage_options: dict[str, Any] | None = None):
        self.url, self.group = url, _check_group_name(group, url)
        self.objects = ObjectStore(url, storage_options)
        self.root_meta = load_root_meta(self.objects)
        self.meta = load_group_meta(self.objects, group)
        check_array_metadata(self.objects, group, self.meta, self.root_meta, url)
        self._zroot = _open_zarr_root(url, storage_options, mode="r+")
        g = self._zroot[group]
        # write_empty_chunks is a runtime option, not stored metadata: every writer must set it (CONTRACTS §3)
        self._arrays = {a.name: _open_array_for_write(g, a.name) for a in schema.group_arrays(self.meta)
                        if a is not schema.PRIOR}

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
        prior=None,
    ) -> CacheWriter:
        """Create the cache/group, or check an existing one matches and grow its epochs if asked for more.

        Refuses (`CacheMismatchError`) a cache made from other data or a group made with other settings, and
        names every setting that differs. ``prior``: the (C, C) class prior of tail rule ``prior``, written now
        when the group has none yet (`put_prior`).
        """
        import time

        import zarr.errors

        _check_group_name(group, url)
        deadline = time.monotonic() + CREATE_RACE_SECONDS
        while True:
            try:
                w = cls._create_or_open(url, group, meta, root, manifest_json, storage_options)
                if prior is not None and w.meta.tail_prior_digest is None:
                    w.put_prior(prior)
                return w
            except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError,
                    _GroupBeingCreated) as e:
                # another process (a concurrent `dump --shards` on another host) is creating the same cache or
                # group right now (zarr's exclusive creates fail): wait for it and open what it made
                if time.monotonic() > deadline:
                    raise CacheWriteError(f"{url}: cannot create or extend teacher group '{group}': another "
                                          f"process seems to be creating it and did not finish ({e})") from e
                time.sleep(0.2)
            except OSError as e:
                raise CacheWriteError(
                    f"{url}: cannot create or extend teacher group '{group}': {_os_error(e)}") from e

    @staticmethod
    def existing_format(url: str, storage_options: dict[str, Any] | None = None) -> tuple[int, int] | None:
        """The format version of the cache at ``url``, None when there is none yet (a dump keeps it)."""
        objects = ObjectStore(url, storage_options)
        if objects.get("zarr.json", **ZARR_JSON) is None:
            return None
        return load_root_meta(objects).format_version  # checked before zarr parses it

    @classmethod
    @numcodecs_quietly()
    def _create_or_open(cls, url, group, meta, root, manifest_json, storage_options) -> CacheWriter:
        objects = ObjectStore(url, storage_options)
        zroot = None
        if objects.get("zarr.json", **ZARR_JSON) is not None:
            stored_root = load_root_meta(objects)  # checked before zarr parses it
            zroot = _open_zarr_root(url, storage_options, mode="r+")
        if zroot is None:
            zroot = _open_zarr_root(url, storage_options, mode="w-", attributes={schema.ATTRS_KEY: root.to_json()})
            objects.put(schema.DATASET_MANIFEST_KEY, json.dumps(manifest_json, sort_keys=True, indent=1).encode())
        else:
            if stored_root.dataset_fingerprint != root.dataset_fingerprint:
                raise CacheMismatchError(
                    f"{url} was made from other data: dataset fingerprint {stored_root.dataset_fingerprint[:16]}… "
                    f"!= {root.dataset_fingerprint[:16]}… of the data given"
                )
        major = load_root_meta(objects).format_version[0]
        if (major == 2) != meta.packed:
            raise CacheMismatchError(
                f"{url} is a format {major}.x cache: its groups {'need' if major == 2 else 'cannot have'} a codec "
                f"(format 2's packed rows); dump into a new cache to change the format"
            )
        if objects.get(f"{group}/zarr.json", **ZARR_JSON) is None:
            g = zroot.create_group(group, attributes={schema.ATTRS_KEY: meta.to_json()})
            if meta.packed:
                g.create_array(schema.ROWS, **schema.packed_array_kwargs(meta, load_root_meta(objects)))
            else:
                for spec in schema.ARRAYS:
                    g.create_array(spec.name, **schema.zarr_array_kwargs(spec, meta, root))
        else:
            stored = load_group_meta(objects, group)
            if any(objects.get(f"{group}/{spec.name}/zarr.json", **ZARR_JSON) is None
                   for spec in schema.group_arrays(stored)):
                raise _GroupBeingCreated(f"{url}: group '{group}' has no arrays (yet?)")
            check_array_metadata(objects, group, stored, load_root_meta(objects), url)
            g = zroot[group]
            diff = schema.settings_diff(stored.settings(), meta.settings())
            if diff:
                raise CacheMismatchError(
                    f"{url} group '{group}' was dumped with other settings; refusing to mix them:\n  "
                    + "\n  ".join(diff)
                )
            if meta.epochs > stored.epochs:  # more epochs later: grow axis 0 (arrays first), old units untouched
                for spec in schema.group_arrays(stored):
                    if spec is schema.PRIOR:
                        continue
                    arr = g[spec.name]
                    arr.resize((meta.epochs, *arr.shape[1:]))
                # only `epochs` changes in the group's attributes; a run's shards and provenance are its own
                # object (`start_run`), so concurrent dumps over other shards never lose each other's
                raw = read_json_object(objects, f"{group}/zarr.json")["attributes"][schema.ATTRS_KEY]
                g.attrs[schema.ATTRS_KEY] = {**raw, "epochs": meta.epochs}
        return cls(url, group, storage_options=storage_options)

    def start_run(self, shards: tuple[int, ...] | None, epochs: int, provenance: dict[str, Any]) -> str:
        """Record this dump run as its own object ``<group>/runs/<start>-<id>.json`` (rank 0, once per run):
        the shards it covers, its epochs and its provenance. Readers take the group's shards as the union over
        the runs (`load_group_meta`), so two `dump --shards` runs on one group from two hosts keep both."""
        import uuid

        stamp = provenance.get("start_time", "")
        stamp = "".join(c for c in str(stamp) if c.isalnum())[:15] or "run"
        key = schema.run_key(self.group, f"{stamp}-{uuid.uuid4().hex[:12]}")
        self._run = {"shards": None if shards is None else sorted(shards), "epochs": epochs,
                     "provenance": provenance}
        self._put_run(key)
        return key

    def finish_run(self, key: str, **provenance: Any) -> None:
        """Complete this run's object with its end time and counts (the same object: no other writer)."""
        self._run["provenance"] = {**self._run["provenance"], **provenance}
        self._put_run(key)

    def _put_run(self, key: str) -> None:
        try:
            self.objects.put(key, json.dumps(self._run, sort_keys=True, indent=1).encode())
        except OSError as e:
            raise CacheWriteError(f"{self.url}: cannot record this run in {key}: {_os_error(e)}") from e

    @numcodecs_quietly()
    def put_prior(self, prior) -> str:
        """Write tail rule ``prior``'s (C, C) class prior once, before any unit, and record its digest."""
        arr = np.ascontiguousarray(np.asarray(prior, dtype=np.float32))
        c = self.meta.num_classes
        if arr.shape != (c, c):
            raise CacheError(f"class prior shaped {arr.shape}, expected ({c}, {c})")
        zroot = _open_zarr_root(self.url, self.objects.storage_options, mode="r+")
        g = zroot[self.group]
        if schema.TAIL_PRIOR in g:
            del g[schema.TAIL_PRIOR]
        g.create_array(schema.TAIL_PRIOR, **schema.prior_array_kwargs(self.meta))[...] = arr
        digest = prior_digest(torch.from_numpy(arr))
        d = g.attrs[schema.ATTRS_KEY]
        d["tail_prior_digest"] = digest
        g.attrs[schema.ATTRS_KEY] = d
        self.meta = GroupMeta.from_json(d)
        return digest

    def encode_rows(self, tk: TopKLogits, view_params: np.ndarray) -> UnitRows | PackedRows:
        """What `write_unit` stores for a unit's rows, in the group's format (format 2 needs ``keep_rest``)."""
        if self.meta.packed:
            return PackedRows(encode_topk(self.meta.packed_codec(), tk, np.asarray(view_params, dtype=np.int16)))
        return UnitRows.from_topk(tk, view_params, self.meta.value_dtype)

    def empty_rows(self) -> UnitRows | PackedRows:
        m = self.meta
        if m.packed:
            return PackedRows(np.zeros((m.packed_codec().n_fields, 0), dtype=m.packed_codec().dtype))
        return UnitRows.empty(m)

    def finished_units(self) -> dict[tuple[int, int], UnitMarker]:
        return read_markers(self.objects, self.group)

    @numcodecs_quietly()
    def write_unit(
        self,
        epoch: int,
        shard: int,
        offsets: np.ndarray,
        rows: UnitRows | PackedRows,
        length: int,
        stats: dict[str, float],
        skipped: tuple[int, ...] = (),
        replay: dict | None = None,
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
            hashes, chunk_keys = {}, []
            keys = schema.unit_chunk_keys(self.group, self.meta, epoch, shard)
            for name, values in rows.as_dict().items():
                arr = self._arrays[name]
                key = keys[name]
                if name == schema.ROWS:  # (fields, rows): views are columns
                    full = np.zeros(arr.shape[2:], dtype=arr.dtype)
                    full[:, offsets] = values
                else:
                    full = np.zeros((L, *arr.shape[3:]), dtype=arr.dtype)
                    full[offsets] = values
                arr[epoch, shard] = full
                # format 2's chunks share one folder, which a listing (du, verify) may have cached: read afresh
                self.objects.fs.invalidate_cache(self.objects.path(key))
                stored = self.objects.get(key)
                if stored is None:
                    raise CacheError(f"chunk {key} was not written (write_empty_chunks must be on)")
                hashes[name] = sha256_hex(stored)
                chunk_keys.append(key)
            self.objects.fsync(chunk_keys)  # chunks durable before the marker that certifies them
            marker = UnitMarker(
                epoch, shard, int(length), hashes, {k: float(v) for k, v in stats.items()},
                tuple(int(s) for s in skipped), replay,
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


def _open_array_for_write(group, name: str):
    # the runtime config that keeps all-zero chunks as stored objects (it is not stored in the metadata)
    return group[name].with_config({"write_empty_chunks": True})
