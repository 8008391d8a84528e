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

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, PackedUnit, RootMeta, UnitMarker, UnitRows
from logitcache.cache.store import (
    ObjectStore,
    _check_group_name,
    _checked_arrays,
    _open_zarr_root,
    list_groups,
    read_markers,
    read_root_meta,
)
from logitcache.errors import CacheError
from logitcache.labels.codecs import decode_unit
from logitcache.labels.tails import TailRule, tail_from_settings
from logitcache.labels.topk import TopKLogits


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

    @property
    def tail(self) -> TailRule:
        """The group's tail rule (``prior``: with its class prior, checked against the recorded digest)."""
        st = self._open()
        if "tail" not in st:
            meta, prior = st["meta"], None
            if meta.tail_name == "prior":
                if not meta.tail_prior_digest:
                    raise CacheError(f"{self.url} group '{st['group']}': tail 'prior' but no class prior was "
                                     f"written (the dump stopped before its calibration pass ended; rerun it)")
                prior = torch.from_numpy(np.asarray(st["arrays"][schema.TAIL_PRIOR][...], dtype=np.float32))
            try:
                st["tail"] = tail_from_settings(meta.tail, prior, meta.tail_prior_digest)
            except ValueError as e:
                raise CacheError(f"{self.url} group '{st['group']}': {e}") from e
        return st["tail"]

    @property
    def codec_name(self) -> str:
        return self.meta.codec_name

    def cached_epoch(self, epoch: int) -> int:
        """The cached epoch whose views training epoch ``epoch`` replays (views cycle past the cached epochs)."""
        return epoch % self.meta.epochs

    def read_unit(self, epoch: int, shard: int) -> UnitRows | PackedUnit:
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
            st["pool"] = ThreadPoolExecutor(len(st["arrays"]), thread_name_prefix="logitcache-read")
        if st["meta"].packed:
            mat = np.asarray(st["arrays"][schema.ROWS][epoch, shard])[:, :n]
            return PackedUnit(decode_unit(st["meta"].packed_codec(), mat, st["meta"].temperatures))
        arrays = {name: a for name, a in st["arrays"].items() if name in schema.ARRAY_NAMES}
        futures = {name: st["pool"].submit(arr.__getitem__, (epoch, shard)) for name, arr in arrays.items()}
        return UnitRows(**{name: np.asarray(f.result())[:n] for name, f in futures.items()})

    def topk_rows(self, rows: UnitRows | PackedUnit, offsets, targets) -> TopKLogits:
        """A `TopKLogits` for the given offsets of a unit (targets come from the data)."""
        return rows.select(offsets).topk(self.meta, targets, tail=self.tail)

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



class UnitTable:
    """The soft-label rows of one (epoch, shard) unit as tensors, read and converted once per shard; one
    `TopKLogits` row per offset (the data supplies each row's target)."""

    def __init__(self, reader: CacheReader, epoch: int, shard: int):
        unit = reader.read_unit(epoch, shard)  # an unfinished unit raises CacheError naming it
        self.marker = reader.markers()[(epoch, shard)]
        self.rows = unit.topk(reader.meta, tail=reader.tail)  # shape checks once per unit (single rows skip them)
        self.view_params = unit.view_params
        self.skipped = frozenset(self.marker.skipped)
        self.where = f"{reader.url} group '{reader.group}' unit (epoch {epoch}, shard {shard})"

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, offset: int, target: int) -> TopKLogits:
        if offset in self.skipped or offset >= len(self):
            raise CacheError(f"{self.where} has no row for offset {offset} (skipped when it was written)")
        o, r = slice(offset, offset + 1), self.rows

        def sl(t):
            return None if t is None else t[o]

        return TopKLogits._trusted(  # the unit's arrays were checked as a whole in __init__
            r.indices[o], r.logits[o], torch.tensor([int(target)]), r.target_logprob[o], r.lse[o], r.temperatures,
            r.num_classes, sl(r.log_rest), r.tail, sl(r.tail_indices), sl(r.tail_logprobs),
        )
