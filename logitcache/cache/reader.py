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

Integrity: every unit read goes through ONE check (`CacheReader.unit_problems`, also `verify`'s): its stored
objects against its marker (presence, sha256), decoded from those very bytes (`decode_chunk`: crc32c, the blosc
header's sizes against the format's before decompressing, an lzma stream decoded up to that size), then the
values' sanity (`unit_value_problems`). A damaged unit raises `DamagedUnitError` naming it and the
verify/--repair commands; a format-2 reader reuses the same steps with its own decoder.

Fork safety: zarr's sync API runs an asyncio loop on a background thread, and a DataLoader worker forked after
the parent touched zarr can hang on it. `CacheReader` therefore opens its store lazily, on first use, in
each process (it re-opens when it notices it runs in a new PID), and pickles without open handles.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, PackedUnit, RootMeta, UnitMarker, UnitRows
from logitcache.cache.store import (
    MANIFEST,
    ObjectStore,
    _check_group_name,
    _open_zarr_root,
    check_array_metadata,
    format_shards,
    list_groups,
    load_group_meta,
    load_root_meta,
    numcodecs_quietly,
    read_epoch_markers,
    read_json_object,
    read_marker,
    read_markers,
    sha256_hex,
)
from logitcache.errors import CacheError, CacheMetadataError, DamagedUnitError
from logitcache.labels.codecs import decode_unit
from logitcache.labels.tails import TailRule, tail_from_settings
from logitcache.labels.topk import TopKLogits


def decode_chunk(data: bytes, dtype: str, shape: tuple[int, ...], where: str, compressor: str = "blosc"
                 ) -> np.ndarray:
    """One stored chunk -> array, by FORMAT.md's codecs (bytes little endian, then blosc or format 2's lzma, then
    crc32c), from the very bytes whose sha256 was checked. Never more than the format's size is decompressed:
    the blosc header's sizes are checked against ``shape`` before decompressing; an lzma stream is decoded with
    an output limit of that size plus one byte and must end exactly there (a forged stream cannot inflate)."""
    import crc32c

    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) < 4 + (16 if compressor == "blosc" else 1):
        raise DamagedUnitError(f"{where}: {len(data)} bytes is too short for a chunk")
    payload, crc = data[:-4], data[-4:]
    if np.uint32(crc32c.crc32c(payload)).tobytes() != crc:
        raise DamagedUnitError(f"{where}: crc32c checksum mismatch")
    if compressor == "lzma":
        return _decode_lzma(payload, dtype, shape, expected, where)
    from numcodecs import blosc

    nbytes, cbytes = int.from_bytes(payload[4:8], "little"), int.from_bytes(payload[12:16], "little")
    if nbytes != expected or cbytes != len(payload):
        raise DamagedUnitError(f"{where}: the blosc header declares {nbytes} bytes ({cbytes} compressed); the "
                               f"format needs {expected} ({len(payload)} stored)")
    out = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("<"))
    try:
        blosc.decompress(payload, out)
    except Exception as e:  # a codec error on bytes that passed their checksums: a writer bug or forgery
        raise DamagedUnitError(f"{where}: does not decompress ({type(e).__name__}: {e})") from None
    return out.astype(dtype, copy=False)


def _decode_lzma(payload: bytes, dtype: str, shape: tuple[int, ...], expected: int, where: str) -> np.ndarray:
    """Format 2's lzma compressor undone (raw LZMA2 with `schema.PACKED_LZMA_FILTERS`, then the byte shuffle)."""
    import lzma

    from numcodecs import Shuffle

    d = lzma.LZMADecompressor(format=schema.PACKED_LZMA_FORMAT, filters=schema.packed_lzma_filters())
    try:
        raw = d.decompress(payload, max_length=expected + 1)
    except lzma.LZMAError as e:  # bytes that passed their checksums: a writer bug or forgery
        raise DamagedUnitError(f"{where}: does not decompress (LZMAError: {e})") from None
    if len(raw) > expected:
        raise DamagedUnitError(f"{where}: the lzma stream inflates past the {expected} bytes the format needs")
    if len(raw) != expected or not d.eof or d.unused_data:
        raise DamagedUnitError(f"{where}: the lzma stream holds {len(raw)} bytes"
                               f"{'' if d.eof else ' and does not end'}; the format needs {expected}")
    words = Shuffle(elementsize=np.dtype(dtype).itemsize).decode(raw)  # the writer's numcodecs shuffle, undone
    return np.frombuffer(words, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype)


def repair_hint(url: str, group: str) -> str:
    return (f"run `logitcache verify {url} --group {group}` to list the damage, and `logitcache dump ... --out "
            f"{url} --group {group} --repair` (the dump's own settings) to redo the damaged units")


def unit_value_problems(rows: UnitRows | PackedUnit, marker: UnitMarker, meta: GroupMeta) -> list[str]:
    """Basic sanity of a unit's values, in either format (rows of skipped samples are padding and not checked):
    finite log-probabilities and log-partitions, indices in [0, C) and distinct per row, top-k log-probs sorted
    largest first and <= 0, top-k mass <= 1 (format 2: also its tail draws' classes in [0, C)). Checked on every
    read and by `verify`."""
    valid = np.ones(len(rows), dtype=bool)
    valid[list(marker.skipped)] = False
    if isinstance(rows, PackedUnit):  # decoded codes: the same quantities under format 2's names
        f = {name: a[valid] for name, a in rows.fields.items()}
        idx, lp, tlp = f["indices"], f["logits"].astype(np.float32), f["target_logprob"]
        finite = {"lse": f["lse"], "log_rest": np.where(np.isneginf(f["log_rest"]), 0.0, f["log_rest"])}
        extra_idx = {"tail_indices": f["tail_indices"]} if "tail_indices" in f else {}
        # the codes round each log-prob by at most half a top-1 step plus one (companded) gap step
        slack = LOGPROB_SLACK + 1.5 * meta.packed_codec().step
    else:
        slack = LOGPROB_SLACK
        idx, lp = rows.topk_indices[valid], rows.topk_logprobs[valid].astype(np.float32)
        tlp, finite, extra_idx = rows.target_logprob[valid], {"lse": rows.lse[valid]}, {}
    out = []
    for name, a in (("topk_logprobs", lp), ("target_logprob", tlp), *finite.items()):
        if not np.isfinite(a).all():
            out.append(f"{name} has {int((~np.isfinite(a)).sum())} non-finite value(s)")
    for name, a in (("topk_indices", idx), *extra_idx.items()):
        if a.size and (a.min() < 0 or a.max() >= meta.num_classes):
            out.append(f"{name} outside [0, {meta.num_classes})")
    if idx.size and meta.k > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        out.append("topk_indices repeat a class within a row")
    with np.errstate(invalid="ignore"):
        if lp.size and (np.diff(lp, axis=1) > LOGPROB_SLACK).any():
            out.append("topk_logprobs are not sorted largest first")
        if lp.size and (lp.max() > LOGPROB_SLACK or tlp.max(initial=-np.inf) > slack):
            out.append("a log-probability is > 0")
        mass = np.exp(lp.astype(np.float64)).sum(axis=1)
        if mass.size and mass.max() > np.exp(slack) + meta.k * LOGPROB_SLACK:
            out.append(f"top-k mass {mass.max():.6f} > 1")
    return out


#: fp16 log-probs are rounded: allow their half-ulp near 0 when checking "<= 0" and "mass <= 1"
LOGPROB_SLACK = 1e-3


# ------------------------------------------------------------------ reader
class CacheReader:
    """Read-only access to one teacher group. Cheap to construct and to pickle; opens lazily per process."""

    def __init__(self, url: str, group: str | None = None, *, storage_options: dict[str, Any] | None = None):
        self.url, self._group_arg, self.storage_options = url, group, storage_options
        self._state: dict[str, Any] | None = None
        self._pid: int | None = None
        #: root and group metadata, read and checked once; travel to DataLoader workers with the reader
        self._facts: dict[str, Any] | None = None
        #: cached epoch -> shard -> marker, read once (`epoch_markers`); travels to DataLoader workers with the
        #: reader (forked or pickled), so they never read markers themselves
        self._epoch_markers: dict[int, dict[int, UnitMarker]] = {}

    def __getstate__(self):
        return {
            "url": self.url,
            "_group_arg": self._group_arg,
            "storage_options": self.storage_options,
            "_state": None,
            "_pid": None,
            "_facts": self._facts,
            "_epoch_markers": self._epoch_markers,
        }

    # -- lazily opened state
    @numcodecs_quietly()
    def _open(self) -> dict[str, Any]:
        if self._state is not None and self._pid == os.getpid():
            return self._state
        objects = ObjectStore(self.url, self.storage_options)
        facts = self._facts
        if facts is None:
            root = load_root_meta(objects)  # our checks first: zarr parses only metadata that passed them
            groups = list_groups(objects)
            group = self._group_arg if self._group_arg is None else _check_group_name(self._group_arg, self.url)
            if group is None:
                if len(groups) != 1:
                    raise CacheError(f"{self.url} holds teacher groups {groups}: choose one with --group")
                group = groups[0]
            if group not in groups:
                raise CacheError(f"{self.url} has no teacher group '{group}' (it has {groups})")
            meta = load_group_meta(objects, group)
            check_array_metadata(objects, group, meta, root, self.url)
            facts = self._facts = {"root": root, "groups": groups, "group": group, "meta": meta}
        # a DataLoader worker gets the facts checked by the process that made the reader: it only opens the arrays
        g = _open_zarr_root(self.url, self.storage_options, mode="r")[facts["group"]]  # only metadata that passed
        self._state = {
            **facts,
            "zgroup": g,
            "arrays": {spec.name: g[spec.name] for spec in schema.group_arrays(facts["meta"])},
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
        d = read_json_object(self.objects, schema.DATASET_MANIFEST_KEY, MANIFEST,
                             missing=CacheMetadataError(f"{self.url} lacks {schema.DATASET_MANIFEST_KEY}"))
        if not isinstance(d, dict):
            raise CacheMetadataError(f"{self.url}: {schema.DATASET_MANIFEST_KEY} is not a JSON object")
        return d

    def markers(self, *, refresh: bool = False) -> dict[tuple[int, int], UnitMarker]:
        """The finished units of the group's (epoch, shard) grid. A marker naming a shard the data does not
        have is malformed; one past the group's epochs (a dump growing them since this reader opened) is not
        this reader's to read."""
        st = self._open()
        if st["markers"] is None or refresh:
            markers = read_markers(st["objects"], st["group"])
            bad = [k for k in markers if k[1] >= st["root"].num_shards]
            if bad:
                raise CacheMetadataError(f"{self.url} group '{st['group']}': marker(s) for unit(s) {bad[:3]} name "
                                         f"shards the cache does not have ({st['root'].num_shards} shards)")
            st["markers"] = {k: m for k, m in markers.items() if k[0] < st["meta"].epochs}
        return st["markers"]

    def epoch_markers(self, epoch: int) -> dict[int, UnitMarker]:
        """shard -> record of cached epoch ``epoch``'s finished units, read once per reader (a listing of the unit
        indexes and a GET of each of the epoch's, one per pack, when the dump wrote them, else the epoch's markers)
        and handed to DataLoader workers with it."""
        if epoch not in self._epoch_markers:
            st = self._open()
            found = read_epoch_markers(st["objects"], st["group"], epoch)
            bad = [s for s in found if s >= st["root"].num_shards]
            if bad:
                raise CacheMetadataError(f"{self.url} group '{st['group']}': marker(s) of epoch {epoch} name "
                                         f"shards {bad[:3]} the cache does not have")
            self._epoch_markers[epoch] = found
        return self._epoch_markers[epoch]

    def unit_marker(self, epoch: int, shard: int, *, fresh: bool = False) -> UnitMarker | None:
        """The marker of unit (epoch, shard), None when it is unfinished. ``fresh``: read it now (one GET; for
        units rewritten while the reader lives, such as PS-KD's slots), else from `epoch_markers`, reading the
        one marker when the epoch's index lacks it (a unit finished since)."""
        if not fresh:
            m = self.epoch_markers(epoch).get(shard)
            if m is not None:
                return m
        st = self._open()
        m = read_marker(st["objects"], st["group"], epoch, shard)
        if m is not None and not fresh:
            self._epoch_markers[epoch][shard] = m
        return m

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

    def unit_where(self, epoch: int, shard: int) -> str:
        return f"{self.url} group '{self.group}' unit (epoch {epoch}, shard {shard})"

    def read_unit(self, epoch: int, shard: int, marker: UnitMarker | None = None) -> UnitRows | PackedUnit:
        """All rows of a finished unit (its length from the marker), checked: every stored object present with
        the sha256 its marker records, sizes as the format says, values sane (`unit_value_problems`). Any
        problem raises `DamagedUnitError` naming the unit and the verify/--repair commands; an unfinished unit
        raises `CacheError`."""
        marker = marker or self.unit_marker(epoch, shard)  # ``marker``: the caller's (verify, PS-KD)
        if marker is None:
            raise CacheError(self._unfinished_message(epoch, shard))
        rows, problems = self.unit_problems(epoch, shard, marker)
        if problems and self.meta.packed:
            # a dump sealing the epoch since this reader read the unit's record moves its bytes into a new pack
            # (and deletes the old object): the unit's record read now says where they are
            now = self.unit_marker(epoch, shard, fresh=True)
            if now is not None and now != marker:
                rows, problems = self.unit_problems(epoch, shard, now)
                if not problems and shard in self._epoch_markers.get(epoch, {}):
                    self._epoch_markers[epoch][shard] = now
        if problems:
            raise DamagedUnitError(f"{self.unit_where(epoch, shard)} is damaged: {'; '.join(problems)}. "
                                   + repair_hint(self.url, self.group))
        return rows

    def _unfinished_message(self, epoch: int, shard: int) -> str:
        st = self._open()
        meta, root = st["meta"], st["root"]
        covered = meta.shard_indices(root.num_shards)
        if shard not in covered:
            return (f"{self.url} group '{st['group']}' covers shards {format_shards(covered)} of the data's "
                    f"{root.num_shards}, not shard {shard}: train on those with --shards "
                    f"{format_shards(covered)}, or dump the rest (logitcache dump ... --shards "
                    f"{format_shards(sorted(set(range(root.num_shards)) - set(covered)))})")
        return (f"{self.url} group '{st['group']}': unit (epoch {epoch}, shard {shard}) is unfinished (no "
                f"marker); rerun the dump to complete it")

    def unit_problems(self, epoch: int, shard: int, marker: UnitMarker
                      ) -> tuple[UnitRows | PackedUnit | None, list[str]]:
        """THE integrity check of one finished unit (the reader's and `verify`'s): the unit's stored objects
        against its marker (presence, sha256), then decoded from those very bytes, then value sanity.
        Returns the rows (None when they cannot be decoded) and the problems found."""
        st = self._open()
        meta, root = st["meta"], st["root"]
        if marker.length != root.shard_lengths[shard]:
            return None, [f"length {marker.length} != shard length {root.shard_lengths[shard]}"]
        where, got, problems = self._stored_bytes(epoch, shard, marker)
        if problems:
            return None, problems
        L = root.max_shard_len
        if meta.packed:  # format 2: its codec decodes the very bytes checked above, then the same value checks
            codec = meta.packed_codec()
            try:
                mat = decode_chunk(got[schema.ROWS], codec.dtype, (codec.n_fields, L), where[schema.ROWS],
                                   codec.compressor)[:, :marker.length]
            except DamagedUnitError as e:
                return None, [str(e)]
            unit = PackedUnit(decode_unit(codec, mat, meta.temperatures))
            return unit, unit_value_problems(unit, marker, meta)
        arrays = {}
        for spec in schema.ARRAYS:
            shape = (L, *meta.trailing_size(spec.trailing))
            try:
                arrays[spec.name] = decode_chunk(got[spec.name], meta.array_dtype(spec), shape,
                                                 where[spec.name])[: marker.length]
            except DamagedUnitError as e:
                problems.append(str(e))
        if problems:
            return None, problems
        rows = UnitRows(**arrays)
        return rows, unit_value_problems(rows, marker, meta)

    def _stored_bytes(self, epoch: int, shard: int, marker: UnitMarker
                      ) -> tuple[dict[str, str], dict[str, bytes], list[str]]:
        """The unit's stored bytes by array name, each checked against the sha256 its record holds: (array ->
        where its bytes lie, for messages; array -> bytes; problems). A sealed format-2 unit's bytes are its range
        of a pack (one ranged GET); any other unit's are its chunk objects (one round trip on object stores)."""
        st = self._open()
        meta, group, objects = st["meta"], st["group"], st["objects"]
        p = marker.pack
        if p is None:
            keys = schema.unit_chunk_keys(group, meta, epoch, shard)
            where = {name: f"chunk {key}" for name, key in keys.items()}
            stored = objects.get_many(list(keys.values()))
            got = {name: stored[key] for name, key in keys.items() if key in stored}
            missing = [f"chunk {key} is missing" for name, key in keys.items() if name not in got]
        else:
            key = schema.rows_object_key(group, meta, epoch, shard, marker)
            where = {schema.ROWS: f"pack {key} bytes [{p.offset}, {p.offset + p.length})"}
            bound = schema.stored_chunk_bound(meta, st["root"])
            if not meta.packed or p.length > bound:
                return where, {}, [f"{where[schema.ROWS]}: a format-1 unit cannot lie in a pack" if not meta.packed
                                   else f"{where[schema.ROWS]}: {p.length} bytes is more than a chunk of this "
                                        f"group can take ({bound})"]
            data = objects.get_range(key, p.offset, p.length)
            got = {} if data is None else {schema.ROWS: data}
            missing = [] if data is not None else [f"pack {key} is missing"]
        record = "unit index" if p is not None else "marker"
        return where, got, missing + [f"{where[name]} differs from its checksum in the {record}"
                                      for name, data in got.items() if sha256_hex(data) != marker.chunks.get(name)]

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

    def __init__(self, reader: CacheReader, epoch: int, shard: int, marker: UnitMarker | None = None):
        self.marker = marker or reader.unit_marker(epoch, shard)
        unit = reader.read_unit(epoch, shard, self.marker)  # an unfinished unit raises CacheError naming it
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
        return TopKLogits._trusted(  # the unit's arrays were checked as a whole in __init__
            r.indices[o], r.logits[o], torch.full((1,), int(target)), r.target_logprob[o], r.lse[o], r.temperatures,
            r.num_classes, None if r.log_rest is None else r.log_rest[o], r.tail,
            None if r.tail_indices is None else r.tail_indices[o],
            None if r.tail_logprobs is None else r.tail_logprobs[o],
        )
