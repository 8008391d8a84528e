"""THE cache format: version, arrays, dtypes, codecs, chunks, metadata keys, unit markers.

Format 2.0 (written by default): one array, ``rows``, shaped (epochs, shards, fields, max_shard_len) and chunked
so a unit is ONE stored object holding every field of its views, packed by `logitcache.labels.codecs`; an
optional ``tail_prior`` array (tail rule ``prior``). Format 1.x (five arrays, below) stays readable and
writable (existing caches keep their format when a dump extends them; PS-KD's store uses it).

Writer, reader, `verify` and `info` all take these facts from here; FORMAT.md describes the same format for
readers in other languages. Layout of a cache (a zarr v3 hierarchy; any fsspec URL):

    CACHE/zarr.json                      root group; attrs["logitcache"] = RootMeta (format, version, dataset)
    CACHE/dataset_manifest.json          the dataset manifest the cache was made from (JSON)
    CACHE/<group>/zarr.json              teacher group; attrs["logitcache"] = GroupMeta (teacher, recipe, k, ...)
    CACHE/<group>/<array>/...            the arrays below, shaped (epochs, shards, max_shard_len, ...)
    CACHE/<group>/units/e{E:05d}-s{S:06d}.json   one completion marker per (epoch, shard) unit, written last

Unit = one (epoch, shard). Every array is chunked ``(1, 1, max_shard_len, ...)`` so a unit is exactly one
stored object per array: ranks and repairs never write the same object. Rows past a shard's length are
padding (zeros). Arrays are written with ``write_empty_chunks=True`` so a missing chunk under a finished unit
is damage, never silently fill values; ``Crc32cCodec`` after the compressor turns a flipped byte into a read
error; the marker's sha256 per chunk object catches replaced or deleted chunks.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from logitcache.errors import CacheError, CacheMetadataError
from logitcache.labels.codecs import COMPRESSORS, LEGACY_COMPRESSOR, MAX_STEP_BITS, PackedCodec
from logitcache.labels.tails import TAIL_NAMES, UNIFORM, TailRule
from logitcache.labels.topk import TopKLogits

FORMAT_NAME = "logitcache-cache"
#: bump the major on any change an old reader would misread; the minor for additions old readers can ignore
FORMAT_VERSION = (2, 0)  # format 1 is 1.1 since per-run records in <group>/runs/ (older readers ignore them)
#: the majors this version reads (and writes: a cache keeps its format when a dump extends it)
READABLE_MAJORS = (1, 2)
FORMAT_1 = (1, 0)
ATTRS_KEY = "logitcache"
DATASET_MANIFEST_KEY = "dataset_manifest.json"
UNITS_DIR = "units"
UNIT_INDEX_DIR = "unit_index"
PACKS_DIR = "packs"  # format 2: a sealed epoch's unit chunks, concatenated (FORMAT.md "Sealed units")
RUNS_DIR = "runs"  # one object per dump run: the shards it covers, its provenance (format 1.1)

# ------------------------------------------------------------------ arrays
# name -> (dtype, trailing shape key, codec). Trailing shape keys: "k" (top-k), "R" (temperatures), "P" (view
# params), "" (scalar per view). Codec choice measured on a 1000-class teacher at k=10 (README, design notes):
# bitshuffle suits small ints and the lse (f32 values close to each other); byte shuffle suits the fp16 log-probs
# and the target log-prob (measured: pipelines/bench_storage.py; README design notes).
TOPK_INDICES = "topk_indices"
TOPK_LOGPROBS = "topk_logprobs"
TARGET_LOGPROB = "target_logprob"
LSE = "lse"
VIEW_PARAMS = "view_params"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    trailing: str  # "", "k", "R" or "P"
    shuffle: str  # Blosc shuffle: "bitshuffle" | "shuffle"
    doc: str


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec(
        TOPK_INDICES,
        "index",
        "k",
        "bitshuffle",
        "class indices of the k largest teacher logits, largest first (int16 when C <= 32767, else int32)",
    ),
    ArraySpec(
        TOPK_LOGPROBS,
        "value",
        "k",
        "shuffle",
        "teacher log-probabilities at T=1 of those classes, z_i - logsumexp(z) (float16 or float32)",
    ),
    ArraySpec(
        TARGET_LOGPROB,
        "float32",
        "",
        "shuffle",
        "exact teacher log-probability at T=1 of the ground-truth class, in or out of the top-k",
    ),
    ArraySpec(LSE, "float32", "R", "bitshuffle", "logsumexp(z / T) for each recorded temperature T"),
    ArraySpec(
        VIEW_PARAMS, "int16", "P", "bitshuffle", "the view's parameters (recipe.param_fields), to replay it exactly"
    ),
)
ARRAY_NAMES = tuple(a.name for a in ARRAYS)

# format 2: every field of a unit's views in one chunk (labels.codecs.PackedCodec), plus the tail prior
ROWS = "rows"
TAIL_PRIOR = "tail_prior"
PACKED = ArraySpec(ROWS, "packed", "FL", "bitshuffle",
                   "format 2: a unit's views packed field by field (FORMAT.md 'The rows array')")
PRIOR = ArraySpec(TAIL_PRIOR, "float32", "CC", "shuffle",
                  "tail rule 'prior': mean tail probability of class j given the top-1 class c, [c, j]")
#: format 2 chunk keys use '.' (c.<e>.<s>.0.0): no directory per epoch and shard on local disks
CHUNK_SEPARATOR_2 = "."
BLOSC_CNAME = "zstd"
BLOSC_CLEVEL = 9  # vs 5: -0.8 B/view on the fp16 values at k=10; chunks are small, speed is not an issue
#: format 2's ``lzma`` compressor (`labels.codecs` docstring): raw LZMA2 after a byte shuffle. No literal context
#: (lc = lp = pb = 0): measured smaller than the defaults (3, 0, 2) on packed units (21.96 vs 22.48 B/view at
#: k = 10); a 1 MiB dictionary holds a whole unit of 1000 views many times (64 MiB, preset 9's, costs 8x the
#: encoding time for the same bytes) and bounds what a decoder allocates. The decoder needs these exact filters
#: (raw streams carry none), so the array's zarr.json must name exactly them (`_packed_problems`).
PACKED_LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20, "lc": 0,
                        "lp": 0, "pb": 0},)
PACKED_LZMA_FORMAT = lzma.FORMAT_RAW


def packed_lzma_filters() -> list[dict[str, int]]:
    """`PACKED_LZMA_FILTERS` as the fresh list of dicts that lzma, numcodecs and zarr.json take."""
    return [dict(f) for f in PACKED_LZMA_FILTERS]
VALUE_DTYPES = ("float16", "float32")
INDEX_DTYPES = ("int16", "int32")

# ------------------------------------------------------------------ limits (FORMAT.md "Limits")
# Everything a cache declares is checked against these before anything is allocated: a hostile zarr.json
# cannot make a reader build a 10^12-row chunk or a 10^12-epoch loop. Generous next to real caches (ImageNet:
# 1,281 shards of ~1,000 samples, tens of epochs, k <= 100).
MAX_EPOCHS = 100_000
MAX_SHARDS = 1_000_000
MAX_SHARD_LEN = 1 << 20  # rows per unit (samples per shard)
MAX_K = 1 << 16
MAX_TEMPERATURES = 64
MAX_PARAMS = 64
MAX_CLASSES = (1 << 31) - 1
MAX_CHUNK_BYTES = 1 << 31  # raw bytes of one unit's chunk of one array
#: stored (compressed) bytes of one unit's chunk: the raw limit plus what a compressor may add to incompressible
#: bytes (LZMA2: ~0.1 %; blosc: its header and a block table), so a pack entry declaring more is refused unread
MAX_STORED_CHUNK_BYTES = MAX_CHUNK_BYTES + (MAX_CHUNK_BYTES >> 6) + (1 << 16)
#: a seal concatenates an epoch's unit chunks into packs of at most this many bytes (a bigger epoch gets several;
#: ImageNet's 1,281 units of ~24 KiB make one pack of ~31 MB), bounding what a sealer holds in memory
PACK_MAX_BYTES = 64 << 20
#: a pack entry's offset (a pack holds PACK_MAX_BYTES plus at most one unit; this bounds a hostile number)
MAX_PACK_OFFSET = 1 << 48
MAX_PRIOR_CLASSES = 1 << 14  # tail rule 'prior' stores C x C float32: 1 GiB at this limit (ImageNet-1k: 4 MB)

# Bytes of each JSON object a reader parses, checked before it is read (`runtime.bounded.read_bounded`): derived
# from the limits above so that every object a cache within them can hold fits, with room to spare.
#: one shard's entry in a list of shards: 8 spaces of indent + 7 digits + ",\n" = 17 bytes in zarr's
#: indented zarr.json (each entry is one shard index or one `shard_lengths` value < 2^21), doubled
_SHARD_ENTRY_BYTES = 32
#: what is not per shard: settings, normalization, recipe and provenance (its command line can be up to the
#: 2 MiB of a Linux ARG_MAX), codecs
_FIXED_JSON_BYTES = 4 << 20
#: a root or group ``zarr.json`` (root: `shard_lengths`; group: its `shards`), an array's, and a run record
#: (its `shards`): ~35 MiB (real ones: 1–2 KiB)
MAX_METADATA_JSON_BYTES = _FIXED_JSON_BYTES + MAX_SHARDS * _SHARD_ENTRY_BYTES
#: a unit marker: ~0.5 KiB fixed (checksums, stats, replay versions), plus its `skipped` and replay `offsets`,
#: each at most MAX_SHARD_LEN offsets of <= 7 digits (<= 12 bytes each in the indented marker, 16 allowed)
MAX_MARKER_BYTES = (64 << 10) + 2 * MAX_SHARD_LEN * 16
#: an epoch's unit index: one compact marker entry per shard (~0.5 KiB in format 2, ~0.8 KiB in format 1; 2 KiB
#: allowed) plus one unit's worth of skipped/replay offsets: ~1.9 GiB at MAX_SHARDS (ImageNet's 1,281: ~1 MiB).
#: A dump never writes a bigger one (`store.write_unit_indexes` and `packs.seal_units` keep the markers instead)
MAX_UNIT_INDEX_BYTES = MAX_SHARDS * (2 << 10) + MAX_MARKER_BYTES
#: class names (a manifest's, and a class-names file `shards scan` reads): ImageNet-21k's 21,841 take ~0.5 MiB
MAX_CLASS_NAMES_BYTES = 64 << 20
#: a URL list file `shards scan` reads: one shard path/URL per line, up to MAX_SHARDS lines of ~1 KiB (paths, s3://
#: URLs, ``pipe:`` commands): ~1 GiB (ImageNet's 1,281 shards: ~0.1 MiB)
MAX_URL_LIST_BYTES = MAX_SHARDS * (1 << 10)
#: a dataset manifest (``manifest.json`` next to the shards and the cache's copy of it): one entry of ~0.3 KiB
#: per shard (two sha256 digests, sizes, its name; 1 KiB allowed, i.e. names up to ~700 characters) for up to
#: MAX_SHARDS shards, plus its class names: ~1 GiB (ImageNet's: ~0.5 MiB)
MAX_MANIFEST_BYTES = MAX_SHARDS * (1 << 10) + MAX_CLASS_NAMES_BYTES


def _int(d: dict, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    if key not in d:
        raise CacheMetadataError(f"{where}: key {key!r} is missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise CacheMetadataError(f"{where}: {key!r} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise CacheMetadataError(f"{where}: {key!r} = {v} is outside [{lo}, {hi if hi is not None else 'inf'}] "
                            "(FORMAT.md, Limits)")
    return v


def _value(d: dict, key: str, where: str, optional: bool) -> Any:
    """``d[key]``; None when the key is optional and absent or null; `CacheMetadataError` when it is missing."""
    if key not in d and not optional:
        raise CacheMetadataError(f"{where}: key {key!r} is missing")
    return d.get(key)


def _str(d: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    v = _value(d, key, where, optional)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise CacheMetadataError(f"{where}: {key!r} must be a string, got {v!r}")
    return v


def _list(d: dict, key: str, where: str, item: type, *, max_len: int, optional: bool = False) -> list | None:
    v = _value(d, key, where, optional)
    if v is None and optional:
        return None
    ok = (int, float) if item is float else item
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, ok) for x in v):
        raise CacheMetadataError(f"{where}: {key!r} must be a list of {item.__name__}, got {_short(v)}")
    if len(v) > max_len:
        raise CacheMetadataError(f"{where}: {key!r} has {len(v)} entries, more than the limit {max_len} (FORMAT.md)")
    return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def raw_bytes_per_view(k: int, n_temperatures: int, n_params: int, num_classes: int, value_dtype: str) -> int:
    """Uncompressed bytes one view takes in the arrays (an upper bound for `dump --dry-run`)."""
    idx = np.dtype(index_dtype(num_classes)).itemsize
    val = np.dtype(value_dtype).itemsize
    return k * (idx + val) + 4 + 4 * n_temperatures + 2 * n_params


def unit_marker_key(group: str, epoch: int, shard: int) -> str:
    return f"{group}/{UNITS_DIR}/e{epoch:05d}-s{shard:06d}.json"


def run_key(group: str, run_id: str) -> str:
    return f"{group}/{RUNS_DIR}/{run_id}.json"


def chunk_key(group: str, array: str, epoch: int, shard: int, ndim: int) -> str:
    """Store key of a format-1 unit's chunk (zarr v3 default chunk key encoding: 'c/' + '/'-joined coords)."""
    return f"{group}/{array}/c/{epoch}/{shard}" + "/0" * (ndim - 2)


def group_arrays(meta: GroupMeta) -> tuple[ArraySpec, ...]:
    """The arrays a group of this metadata holds."""
    if not meta.packed:
        return ARRAYS
    # the prior exists once the dump's calibration pass wrote it (its digest is then in the metadata)
    return (PACKED, PRIOR) if meta.tail_name == "prior" and meta.tail_prior_digest else (PACKED,)


def unit_chunk_keys(group: str, meta: GroupMeta, epoch: int, shard: int) -> dict[str, str]:
    """Array name -> store key of unit (epoch, shard)'s chunk, in either format."""
    if meta.packed:
        return {ROWS: f"{group}/{ROWS}/c.{epoch}.{shard}.0.0"}
    return {a.name: chunk_key(group, a.name, epoch, shard, 3 + (a.trailing != "")) for a in ARRAYS}


def rows_object_key(group: str, meta: GroupMeta, epoch: int, shard: int, record: UnitMarker) -> str:
    """The object holding format-2 unit (epoch, shard)'s stored chunk, as its record says: its epoch's pack when the
    record has a place in one (the unit's bytes are then that range of it), else its own chunk object."""
    if record.pack is not None:
        return pack_key(group, epoch, record.pack.pack_id)
    return unit_chunk_keys(group, meta, epoch, shard)[ROWS]


def stored_chunk_bound(meta: GroupMeta, root: RootMeta) -> int:
    """The most bytes a format-2 unit's stored chunk can take (its raw size plus what LZMA2 or blosc and the
    crc32c add to incompressible bytes, with room): a pack entry declaring more is refused before it is read."""
    codec = meta.packed_codec()
    raw = codec.n_fields * root.max_shard_len * np.dtype(codec.dtype).itemsize
    return raw + (raw >> 6) + (1 << 16)


# ------------------------------------------------------------------ what a cache may name (safe opening)
#: a teacher group is one path component: no '/', no '..', not hidden, not a name the root already uses
GROUP_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")
#: the only codecs a cache's arrays may name. None of them runs code from the store; a store naming any other
#: codec (a third-party one registered in this environment, say) is refused before zarr parses the array.
ALLOWED_CODECS = frozenset({"bytes", "blosc", "crc32c"})
#: format 2's ``rows`` array may also name these, and then only with exactly `packed_codecs_json`'s settings
PACKED_LZMA_CODECS = frozenset({"numcodecs.shuffle", "numcodecs.lzma"})


def validate_group_name(name: str) -> str:
    """``name`` if it is a safe teacher-group name (it becomes a path component of the store), else ValueError."""
    if not isinstance(name, str) or not GROUP_NAME_PATTERN.fullmatch(name) or ".." in name or name.endswith(".json"):
        raise ValueError(
            f"unsafe teacher group name {name!r}: a group name is one path component matching "
            f"{GROUP_NAME_PATTERN.pattern} (no '/', no '..', not ending in .json)"
        )
    return name


def array_metadata_problems(spec: ArraySpec, d: Any, meta: GroupMeta, root: RootMeta | None = None) -> list[str]:
    """Differences between a stored array's ``zarr.json`` (parsed JSON) and what this format allows for it.

    Checked before zarr parses the metadata, so a store cannot make zarr decode chunks with a codec outside
    `ALLOWED_CODECS`, or with another dtype/shape than the schema's.
    """
    if not isinstance(d, dict):
        return ["zarr.json is not a JSON object"]
    out = []
    if d.get("zarr_format") != 3 or d.get("node_type") != "array":
        out.append(f"not a zarr v3 array (zarr_format {d.get('zarr_format')!r}, node_type {d.get('node_type')!r})")
    if spec.name in (ROWS, TAIL_PRIOR):
        out += _packed_problems(spec, d, meta, root)
    codecs = d.get("codecs")
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs] if isinstance(codecs, list) else None
    allowed = ALLOWED_CODECS | PACKED_LZMA_CODECS if spec.name == ROWS else ALLOWED_CODECS
    if names is None or any(n not in allowed for n in names):
        out.append(f"codecs {names} are not all in the allowed set {sorted(allowed)}")
    allowed_dtypes = {"index": INDEX_DTYPES, "value": VALUE_DTYPES}.get(spec.dtype, (spec.dtype,))
    if spec.name in (ROWS, TAIL_PRIOR):  # format 2: the codec's integer words, the prior's float32
        allowed_dtypes = ("uint8", "uint16", "uint32", "float32")
    if d.get("data_type") != meta.array_dtype(spec) or d.get("data_type") not in allowed_dtypes:
        out.append(f"data_type {d.get('data_type')!r} != {meta.array_dtype(spec)!r}")
    # shape and chunk shape exactly as the metadata says: a declared 10^12 rows is refused, never allocated
    trailing = list(meta.trailing_size(spec.trailing))
    lead = [meta.epochs, root.num_shards, root.max_shard_len] if root is not None else None
    shape = d.get("shape")
    if spec.name in (ROWS, TAIL_PRIOR):  # format 2's packed arrays: leading dims and sizes checked by the reader
        lead = None
    # axis 0 may run ahead of the group's epochs while a dump grows them (arrays are resized first)
    if spec.name in (ROWS, TAIL_PRIOR):
        pass
    elif not isinstance(shape, list) or len(shape) != 3 + len(trailing) or shape[3:] != trailing or (
            lead is not None and (shape[1:3] != lead[1:] or not isinstance(shape[0], int)
                                  or not lead[0] <= shape[0] <= MAX_EPOCHS)):
        want = f"{[*lead, *trailing]}" if lead is not None else f"(epochs, shards, rows, *{trailing})"
        out.append(f"shape {_short(shape)} != {want} (epochs, shards, rows from the group and root metadata)")
    grid = d.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) and isinstance(
        grid.get("configuration"), dict) else None
    if spec.name not in (ROWS, TAIL_PRIOR) and (
            not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list)) or (
            lead is not None and chunks != [1, 1, lead[2], *trailing]):
        want = [1, 1, lead[2], *trailing] if lead is not None else "(1, 1, rows, ...)"
        out.append(f"chunk shape {_short(chunks)} != {want} (one chunk per unit)")
    elif lead is not None and spec.name not in (ROWS, TAIL_PRIOR) and d.get("data_type") in allowed_dtypes and (
            lead[2] * int(np.prod(trailing)) * np.dtype(d["data_type"]).itemsize > MAX_CHUNK_BYTES):
        out.append(f"one unit's chunk ({lead[2]} rows x {trailing}) exceeds {MAX_CHUNK_BYTES} bytes")
    cke = d.get("chunk_key_encoding")
    default_cke = (None, {"name": "default", "configuration": {"separator": "/"}}, {"name": "default"})
    if spec.name not in (ROWS, TAIL_PRIOR) and cke not in default_cke:
        out.append(f"chunk_key_encoding {_short(cke)} is not the default '/' encoding")
    for key in ("storage_transformers",):
        if d.get(key):
            out.append(f"{key} are not allowed")
    return out


def _packed_problems(spec: ArraySpec, d: dict, meta: GroupMeta, root: RootMeta | None) -> list[str]:
    """Format 2's arrays: the shape and chunk shape exactly as the group and root metadata say (axis 0 may run
    ahead of ``epochs`` while a dump grows them, up to `MAX_EPOCHS`), one chunk per unit (one for the prior),
    '.'-separated chunk keys. A declared 10^12 rows or shards is refused here, never allocated."""
    out = []
    shape = d.get("shape")
    grid = d.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) and isinstance(
        grid.get("configuration"), dict) else None
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        out.append(f"chunk grid {_short(grid)} is not 'regular'")
    if spec.name == ROWS:
        fields = meta.packed_codec().n_fields
        rows = root.max_shard_len if root is not None else None
        ok = (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int for n in shape)
              and meta.epochs <= shape[0] <= MAX_EPOCHS and shape[2] == fields
              and (root is None or shape[1] == root.num_shards) and (rows is None or shape[3] == rows)
              and 1 <= shape[1] <= MAX_SHARDS and 1 <= shape[3] <= MAX_SHARD_LEN)
        if not ok:
            want = (f"({meta.epochs}..{MAX_EPOCHS} epochs, {root.num_shards} shards, {fields} fields, {rows} rows)"
                    if root is not None else f"(epochs, shards, {fields} fields, rows)")
            out.append(f"shape {_short(shape)} is not {want} (from the group and root metadata)")
        elif chunks != [1, 1, fields, shape[3]]:
            out.append(f"chunks {_short(chunks)} are not one unit ([1, 1, {fields}, {shape[3]}])")
        elif fields * shape[3] * np.dtype(meta.packed_codec().dtype).itemsize > MAX_CHUNK_BYTES:
            out.append(f"one unit's chunk ({fields} fields x {shape[3]} rows) exceeds {MAX_CHUNK_BYTES} bytes")
        codec, codecs = meta.packed_codec(), d.get("codecs")
        if codec.compressor == "lzma" and codecs != packed_codecs_json(codec):
            out.append(f"codecs {_short(codecs)} are not the lzma compressor's "
                       f"{_short(packed_codecs_json(codec))} (the group's codec says 'compressor': 'lzma')")
        elif codec.compressor != "lzma" and any(isinstance(c, dict) and c.get("name") in PACKED_LZMA_CODECS
                                                 for c in (codecs if isinstance(codecs, list) else ())):
            out.append(f"codecs {_short(codecs)} name lzma but the group's codec says 'compressor': "
                       f"{codec.compressor!r}")
    else:
        c = meta.num_classes
        if c > MAX_PRIOR_CLASSES:
            out.append(f"a class prior of {c} x {c} exceeds the limit of {MAX_PRIOR_CLASSES} classes")
        elif shape != [c, c] or chunks != [c, c]:
            out.append(f"shape {_short(shape)} / chunks {_short(chunks)} are not one ({c}, {c}) chunk")
    enc = d.get("chunk_key_encoding")
    if not isinstance(enc, dict) or enc.get("name") != "default" or \
            enc.get("configuration", {}).get("separator") != CHUNK_SEPARATOR_2:
        out.append(f"chunk_key_encoding {enc} is not the default with separator '{CHUNK_SEPARATOR_2}'")
    return out


def _check_codec_and_tail(codec: dict | None, tail: dict | None, num_classes: int, k: int, where: str) -> None:
    """Format 2's ``codec`` and ``tail`` objects: known names, integer settings inside FORMAT.md's limits (they
    decide the unit's field count, so the size of what a reader allocates), a class prior only up to
    `MAX_PRIOR_CLASSES`."""
    if codec is None:
        if tail is not None and tail.get("name", "uniform") != "uniform":
            raise CacheMetadataError(f"{where}: tail {_short(tail)} needs a format 2 codec")
        return
    if codec.get("name") != "packed":
        raise CacheMetadataError(f"{where}: codec name {_short(codec.get('name'))} is not 'packed'")
    step_bits = _int(codec, "step_bits", f"{where} codec", 0, MAX_STEP_BITS)
    if "rest_bits" in codec:
        _int(codec, "rest_bits", f"{where} codec", 0, step_bits)
    m = _int(codec, "tail_samples", f"{where} codec", 0, MAX_K) if "tail_samples" in codec else 0
    if "compressor" in codec and codec["compressor"] not in COMPRESSORS:
        raise CacheMetadataError(f"{where}: codec 'compressor' {_short(codec['compressor'])} is not one of "
                                 f"{', '.join(COMPRESSORS)}")
    knee = codec.get("knee", 0.0)
    if type(knee) not in (int, float) or not 0 <= knee <= 64:
        raise CacheMetadataError(f"{where}: codec 'knee' must be a number in [0, 64] nats, got {_short(knee)}")
    name = (tail or {}).get("name", "uniform")
    if name not in TAIL_NAMES:
        raise CacheMetadataError(f"{where}: tail name {_short(name)} is not one of {', '.join(TAIL_NAMES)}")
    if name == "sampled" and _int(tail, "m", f"{where} tail", 1, MAX_K) != m:
        raise CacheMetadataError(f"{where}: tail 'm' {tail['m']} != the codec's tail_samples {m}")
    if name != "sampled" and m:
        raise CacheMetadataError(f"{where}: codec tail_samples {m} but tail {name!r} draws none")
    if name == "prior":
        if "prior_views" in tail:
            _int(tail, "prior_views", f"{where} tail", 0, 1 << 40)
        if num_classes > MAX_PRIOR_CLASSES:
            raise CacheMetadataError(f"{where}: tail 'prior' stores a {num_classes} x {num_classes} class prior; "
                                     f"the limit is {MAX_PRIOR_CLASSES} classes")


# ------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class RootMeta:
    """Root attributes: what the cache is and which data it was made from."""

    dataset_fingerprint: str
    num_classes: int
    num_shards: int
    shard_lengths: tuple[int, ...]
    format: str = FORMAT_NAME
    format_version: tuple[int, int] = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shard_lengths"] = list(self.shard_lengths)
        d["format_version"] = list(self.format_version)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "root zarr.json") -> RootMeta:
        """Parsed and checked: types, limits, and that ``shard_lengths`` has ``num_shards`` entries
        (`CacheMetadataError` naming the key otherwise)."""
        if not isinstance(d, dict):
            raise CacheMetadataError(f"{where}: the '{ATTRS_KEY}' attributes are not a JSON object")
        version = _list(d, "format_version", where, int, max_len=2)
        if len(version) != 2:
            raise CacheMetadataError(f"{where}: 'format_version' must be [major, minor], got {version}")
        fingerprint = _str(d, "dataset_fingerprint", where)
        num_shards = _int(d, "num_shards", where, 1, MAX_SHARDS)
        lengths = _list(d, "shard_lengths", where, int, max_len=MAX_SHARDS)
        if len(lengths) != num_shards:
            raise CacheMetadataError(f"{where}: 'shard_lengths' has {len(lengths)} entries for num_shards {num_shards}")
        if any(n < 0 or n > MAX_SHARD_LEN for n in lengths) or max(lengths) < 1:
            raise CacheMetadataError(f"{where}: 'shard_lengths' must be in [0, {MAX_SHARD_LEN}] with one > 0 "
                                f"(FORMAT.md, Limits), got {_short(lengths)}")
        return cls(
            dataset_fingerprint=fingerprint,
            num_classes=_int(d, "num_classes", where, 1, MAX_CLASSES),
            num_shards=num_shards,
            shard_lengths=tuple(lengths),
            format=_str(d, "format", where),
            format_version=tuple(version),
        )

    @property
    def max_shard_len(self) -> int:
        return max(self.shard_lengths)


@dataclass(frozen=True)
class GroupMeta:
    """A teacher group's attributes: everything that determines the cached bytes (plus provenance).

    ``settings()`` is what a rerun must match; ``epochs`` may grow (a rerun with a larger --epochs adds epochs).
    """

    teacher: str
    weights: str | None
    weights_digest: str
    num_classes: int
    normalization: dict[str, list[float]]
    recipe: dict[str, Any]
    param_fields: tuple[str, ...]
    k: int
    temperatures: tuple[float, ...]
    seed: int
    epochs: int
    value_dtype: str | None = "float16"  # format 1 only (None in format 2)
    index_dtype: str | None = "int16"  # format 1 only
    #: format 2: the packed codec's settings (`PackedCodec.to_json`); None: format 1's five arrays
    codec: dict[str, Any] | None = None
    #: format 2: the tail rule's settings (`labels.tails.tail_settings`); None: uniform (format 1's rule)
    tail: dict[str, Any] | None = None
    #: tail 'prior': sha256 of the class prior (float32 bytes), set once the calibration pass wrote it
    tail_prior_digest: str | None = None
    #: the shards dumped so far (a dump may cover part of the data, `--shards`); None: every shard of the data.
    #: Completeness is judged over these shards x epochs.
    shards: tuple[int, ...] | None = None
    #: the teacher body's compute precision (fp32 | bf16 | fp16, `runtime.precision`); groups written before it
    #: was recorded read as what the dump did then (`historical_teacher_precision`)
    teacher_precision: str = "fp32"
    provenance: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    #: False when ``teacher_precision`` was inferred for an old group (not stored; `info` says so)
    teacher_precision_recorded: bool = field(default=True, compare=False, repr=False)

    #: fields that may differ between a cache and a rerun: epochs and shards grow, provenance accumulates, and
    #: `weights` only says where the weights came from (the same file by another path is the same teacher):
    #: `weights_digest` decides whether the teacher is the same
    MUTABLE = ("epochs", "shards", "provenance", "weights", "tail_prior_digest")

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k not in self.MUTABLE}

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["param_fields"] = list(self.param_fields)
        d["temperatures"] = list(self.temperatures)
        d["provenance"] = list(self.provenance)
        d["shards"] = None if self.shards is None else list(self.shards)
        del d["teacher_precision_recorded"]
        return d

    def shard_indices(self, num_shards: int) -> list[int]:
        """The shards this group covers (all of the data's when ``shards`` is None)."""
        return list(range(num_shards)) if self.shards is None else list(self.shards)

    @classmethod
    def from_json(cls, d: Any, where: str = "group zarr.json") -> GroupMeta:
        """Parsed and checked: every key's type and the limits of FORMAT.md (`CacheMetadataError` naming the key)."""
        if not isinstance(d, dict):
            raise CacheMetadataError(f"{where}: the '{ATTRS_KEY}' attributes are not a JSON object")
        num_classes = _int(d, "num_classes", where, 1, MAX_CLASSES)
        k = _int(d, "k", where, 1, min(MAX_K, num_classes))
        temperatures = _list(d, "temperatures", where, float, max_len=MAX_TEMPERATURES)
        if not temperatures or any(not (0 < t < float("inf")) for t in temperatures) or 1.0 not in temperatures:
            raise CacheMetadataError(f"{where}: 'temperatures' must be positive numbers including 1.0, got "
                                f"{_short(temperatures)}")
        param_fields = _list(d, "param_fields", where, str, max_len=MAX_PARAMS)
        shards = _list(d, "shards", where, int, max_len=MAX_SHARDS, optional=True)
        if shards is not None and any(s < 0 or s >= MAX_SHARDS for s in shards):
            raise CacheMetadataError(f"{where}: 'shards' must be shard indices, got {_short(shards)}")
        for key in ("normalization", "recipe"):
            if not isinstance(d.get(key), dict):
                raise CacheMetadataError(f"{where}: {key!r} must be a JSON object, got {_short(d.get(key))}")
        provenance = d.get("provenance", [])
        if not isinstance(provenance, list) or not all(isinstance(p, dict) for p in provenance):
            raise CacheMetadataError(f"{where}: 'provenance' must be a list of objects")
        codec, tail = d.get("codec"), d.get("tail")
        for key, v in (("codec", codec), ("tail", tail)):
            if v is not None and not isinstance(v, dict):
                raise CacheMetadataError(f"{where}: {key!r} must be a JSON object or null, got {_short(v)}")
        _check_codec_and_tail(codec, tail, num_classes, k, where)
        value_dtype = _str(d, "value_dtype", where, optional=True)
        index = _str(d, "index_dtype", where, optional=True)
        if codec is None:  # format 1: the five arrays' dtypes
            value_dtype, index = value_dtype or "float16", index or "int16"
            if value_dtype not in VALUE_DTYPES:
                raise CacheMetadataError(f"{where}: 'value_dtype' {value_dtype!r} is not one of {VALUE_DTYPES}")
            if index != index_dtype(num_classes):
                raise CacheMetadataError(f"{where}: 'index_dtype' {index!r} != {index_dtype(num_classes)!r} for "
                                         f"{num_classes} classes")
        precision = _str(d, "teacher_precision", where, optional=True)
        if precision is not None and precision not in ("fp32", "bf16", "fp16"):
            raise CacheMetadataError(f"{where}: 'teacher_precision' {precision!r} is not fp32, bf16 or fp16")
        return cls(
            teacher=_str(d, "teacher", where),
            weights=_str(d, "weights", where, optional=True),
            weights_digest=_str(d, "weights_digest", where),
            num_classes=num_classes,
            normalization=d["normalization"],
            recipe=d["recipe"],
            param_fields=tuple(param_fields),
            k=k,
            temperatures=tuple(float(t) for t in temperatures),
            seed=_int(d, "seed", where, -(1 << 63), (1 << 64) - 1),
            epochs=_int(d, "epochs", where, 1, MAX_EPOCHS),
            value_dtype=value_dtype,
            index_dtype=index,
            codec=codec,
            tail=tail,
            tail_prior_digest=_str(d, "tail_prior_digest", where, optional=True),
            shards=None if shards is None else tuple(shards),
            provenance=tuple(provenance),
            # groups written before it was recorded read as what the dump did then
            teacher_precision=precision or historical_teacher_precision(provenance),
            teacher_precision_recorded=precision is not None,
        )

    def trailing_size(self, trailing: str) -> tuple[int, ...]:
        return {"": (), "k": (self.k,), "R": (len(self.temperatures),), "P": (len(self.param_fields),),
                "FL": (), "CC": ()}[trailing]

    def array_dtype(self, spec: ArraySpec) -> str:
        if spec.dtype == "packed":
            return self.packed_codec().dtype
        return {"index": self.index_dtype, "value": self.value_dtype}.get(spec.dtype, spec.dtype)

    @property
    def packed(self) -> bool:
        """Format 2 (one packed array) rather than format 1's five arrays."""
        return self.codec is not None

    def packed_codec(self) -> PackedCodec:
        c = self.codec or {}
        if c.get("name") != "packed":
            raise CacheError(f"unknown codec {c.get('name')!r} (this logitcache knows 'packed')")
        return PackedCodec(self.k, self.num_classes, len(self.temperatures), len(self.param_fields),
                           step_bits=int(c["step_bits"]), tail_samples=int(c.get("tail_samples", 0)),
                           knee=float(c.get("knee", 0.0)),
                           rest_bits=int(c["rest_bits"]) if c.get("rest_bits") is not None else None,
                           compressor=c.get("compressor", LEGACY_COMPRESSOR))

    @property
    def codec_name(self) -> str:
        return self.packed_codec().name if self.packed else f"arrays-{self.value_dtype}"

    @property
    def tail_name(self) -> str:
        return (self.tail or {}).get("name", "uniform")


def historical_teacher_precision(provenance) -> str:
    """The precision of a group written before ``teacher_precision`` was recorded: the dump then ran the teacher
    under bf16 autocast on CUDA and in float32 on the CPU, so: ``bf16`` when a dump's command line named a CUDA
    ``--device``, else ``fp32`` (the CPU)."""
    for p in provenance:
        words = str(p.get("command_line", "")).replace("=", " ").split()
        if any(a == "--device" and b.startswith("cuda") for a, b in zip(words, words[1:], strict=False)):
            return "bf16"
    return "fp32"


def settings_diff(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``GroupMeta.settings()`` dicts (canonical JSON comparison)."""
    out = []
    for key in sorted(set(stored) | set(requested)):
        a, b = stored.get(key), requested.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{key}: cache has {json.dumps(a, sort_keys=True)}, requested {json.dumps(b, sort_keys=True)}")
    return out


# ------------------------------------------------------------------ unit markers
@dataclass(frozen=True)
class PackRef:
    """Where a sealed format-2 unit's chunk lies: ``length`` bytes from ``offset`` of the epoch's pack object
    ``pack_id`` (`pack_key`), the very bytes its standalone chunk object held (FORMAT.md "Sealed units")."""

    pack_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class UnitMarker:
    """Written last for a unit; its presence means the unit is finished.

    ``chunks`` maps array name -> sha256 of that unit's stored chunk object (compressed bytes), so `verify`
    catches deleted or replaced chunks; ``stats`` feed `info` (teacher accuracy, top-k mass) without a scan;
    ``skipped`` lists offsets of samples that were skipped as corrupt (their rows are padding).
    ``replay`` (optional; absent in caches written before it): ``{"offsets": [...], "sha256": ..., "versions":
    {...}}``, the sha256 of the uint8 pixels of the unit's first finished views at those offsets and the library
    versions that made them (`logitcache.views.digest`); readers recompute it to prove their pixels are the
    teacher's.
    ``pack`` (only in an entry of a pack's unit index, never in a marker object): where the sealed unit's chunk
    lies in its epoch's pack; the unit's record is otherwise the marker it was (`unpacked`).
    """

    epoch: int
    shard: int
    length: int
    chunks: dict[str, str]
    stats: dict[str, float]
    skipped: tuple[int, ...] = ()
    replay: dict[str, Any] | None = None
    pack: PackRef | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, pack=None))
        del d["pack"]
        d["skipped"] = list(self.skipped)
        if self.replay is None:
            del d["replay"]
        if self.pack is not None:  # its pack is the index's own (the index key names it)
            d["pack"] = [self.pack.offset, self.pack.length]
        return d

    def unpacked(self) -> UnitMarker:
        """The record without its location: what a marker object and a pack's index entry of one unit share."""
        return dataclasses.replace(self, pack=None)

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "", arrays: tuple[str, ...] | None = None) -> UnitMarker:
        """Parsed and checked: types, ``length`` within the limit, ``skipped`` inside the unit, and ``chunks``
        naming exactly ``arrays`` (an unexpected or missing chunk key is malformed, never ignored)."""
        try:
            d = json.loads(data)
        except ValueError as e:
            raise CacheMetadataError(f"unit marker {where} is malformed: {type(e).__name__}: {e}") from e
        return cls.from_json(d, where=where, arrays=arrays)

    @classmethod
    def from_json(cls, d: Any, *, where: str = "", arrays: tuple[str, ...] | None = None,
                  pack_id: str | None = None) -> UnitMarker:
        """A marker from its parsed JSON (a marker object, or an entry of a unit index), checked as `from_bytes`.
        ``pack_id``: the entry is one of that pack's unit index and must say where in the pack its unit lies
        (``"pack": [offset, length]``); anything else must not."""
        try:
            pack = d.get("pack")
            if pack is not None:
                if not isinstance(pack, list) or len(pack) != 2 or not all(type(x) is int for x in pack):
                    raise TypeError(f"'pack' must be [offset, length] (integers), not {pack!r}")
                pack = PackRef(pack_id or "", pack[0], pack[1])
            marker = cls(
                epoch=int(d["epoch"]),
                shard=int(d["shard"]),
                length=int(d["length"]),
                chunks={str(k): str(v) for k, v in d["chunks"].items()},
                stats={str(k): float(v) for k, v in d["stats"].items()},
                skipped=tuple(int(x) for x in d.get("skipped", ())),
                replay=_replay_record(d.get("replay")),
                pack=pack,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CacheMetadataError(f"unit marker {where} is malformed: {type(e).__name__}: {e}") from e
        problems = []
        if (marker.pack is None) != (pack_id is None):
            problems.append("a pack's unit index entry without its place in the pack" if pack_id is not None
                            else "a place in a pack ('pack') outside a pack's unit index")
        elif pack is not None and not (0 <= pack.offset <= MAX_PACK_OFFSET
                                       and 0 < pack.length <= MAX_STORED_CHUNK_BYTES):
            problems.append(f"pack range [{pack.offset}, +{pack.length}) beyond the limits")
        if not (0 <= marker.epoch < MAX_EPOCHS and 0 <= marker.shard < MAX_SHARDS
                and 0 <= marker.length <= MAX_SHARD_LEN):
            problems.append(f"epoch/shard/length {marker.epoch}/{marker.shard}/{marker.length} beyond the limits")
        if arrays is None:  # either format's arrays (the marker's group says which; readers check it per unit)
            arrays = (ROWS,) if set(marker.chunks) == {ROWS} else ARRAY_NAMES
        extra, missing = sorted(set(marker.chunks) - set(arrays)), sorted(set(arrays) - set(marker.chunks))
        if extra:
            problems.append(f"unexpected chunk key(s) {extra}")
        if missing:
            problems.append(f"no checksum for chunk(s) {missing}")
        if any(not re.fullmatch(r"[0-9a-f]{64}", v) for v in marker.chunks.values()):
            problems.append("a chunk checksum is not a sha256 hex digest")
        if any(not 0 <= o < marker.length for o in marker.skipped):
            problems.append(f"skipped offsets outside [0, {marker.length})")
        if problems:
            raise CacheMetadataError(f"unit marker {where} is malformed: " + "; ".join(problems))
        return marker


def _replay_record(d: Any) -> dict[str, Any] | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("sha256"), str) or not isinstance(d.get("offsets"), list):
        raise TypeError(f"replay entry {d!r} is not {{offsets, sha256, versions}}")
    return {"offsets": [int(o) for o in d["offsets"]], "sha256": d["sha256"],
            "versions": {str(k): str(v) for k, v in dict(d.get("versions", {})).items()}}


# ------------------------------------------------------------------ unit indexes and packs (per cached epoch)
def unit_index_key(group: str, epoch: int, pack_id: str | None = None) -> str:
    """An epoch's unit index: finished units' markers in one object, so a reader needs one GET for an epoch
    instead of one per unit. Format 1 (and format 2 before packs): ``e<EEEEE>.json``, every unit of the epoch,
    markers staying the truth. Format 2 seals its units into packs: ``e<EEEEE>-<pack id>.json`` lists the units
    whose chunks pack ``pack_id`` holds, and is their only record once their marker objects are deleted."""
    return f"{group}/{UNIT_INDEX_DIR}/e{epoch:05d}{'' if pack_id is None else '-' + pack_id}.json"


def pack_key(group: str, epoch: int, pack_id: str) -> str:
    """A format-2 pack: sealed unit chunks of epoch ``epoch`` back to back; ``pack_id`` = the first 16 hex digits
    of the sha256 of its bytes, so a seal of the same units writes the same object (and cache bytes stay a
    function of the seed, whatever the rank count or the resumes)."""
    return f"{group}/{PACKS_DIR}/e{epoch:05d}-{pack_id}.bin"


def pack_id_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


_UNIT_INDEX_NAME = re.compile(r"e(\d{5})(?:-([0-9a-f]{16}))?\.json")


def unit_index_name(key: str) -> tuple[int, str | None] | None:
    """(epoch, pack id or None) of a unit index key (``…/unit_index/e<EEEEE>[-<pack id>].json``), None for any
    other name (a temp file of an interrupted write, say)."""
    m = _UNIT_INDEX_NAME.fullmatch(key.rsplit("/", 1)[-1])
    return None if m is None else (int(m.group(1)), m.group(2))


def unit_index_bytes(epoch: int, markers: list[UnitMarker]) -> bytes:
    entries = [m.to_json() for m in sorted(markers, key=lambda m: m.shard)]
    return json.dumps({"epoch": epoch, "markers": entries}, sort_keys=True, separators=(",", ":")).encode()


def parse_unit_index(data: bytes, epoch: int, *, where: str = "", pack_id: str | None = None
                     ) -> dict[int, UnitMarker]:
    """shard -> marker of a unit index (``pack_id``: of that pack's index, whose every entry says where in the
    pack its unit lies); `CacheError` for a malformed one, or one that lists a unit of another epoch or a unit
    twice."""
    try:
        d = json.loads(data)
        entries, stated = d["markers"], int(d["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"unit index {where} is malformed: {e}") from e
    if stated != epoch or not isinstance(entries, list):
        raise CacheError(f"unit index {where} is not the unit index of epoch {epoch}")
    out: dict[int, UnitMarker] = {}
    for entry in entries:
        m = UnitMarker.from_json(entry, where=where, pack_id=pack_id)
        if m.epoch != epoch or m.shard in out:
            raise CacheError(f"unit index {where} lists unit (epoch {m.epoch}, shard {m.shard}) wrongly or twice")
        out[m.shard] = m
    return out


def zarr_array_kwargs(spec: ArraySpec, meta: GroupMeta, root: RootMeta) -> dict[str, Any]:
    """Arguments for ``zarr.create_array`` of one cache array (shape, chunks, dtype, codecs, fill)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    trailing = meta.trailing_size(spec.trailing)
    L = root.max_shard_len
    return {
        "shape": (meta.epochs, root.num_shards, L, *trailing),
        "chunks": (1, 1, L, *trailing),
        "dtype": meta.array_dtype(spec),
        "fill_value": 0,
        "compressors": [BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=spec.shuffle), Crc32cCodec()],
        "dimension_names": (
            "epoch",
            "shard",
            "row",
            *(("k",) if spec.trailing == "k" else ()),
            *(("temperature",) if spec.trailing == "R" else ()),
            *(("param",) if spec.trailing == "P" else ()),
        ),
        "attributes": {"doc": spec.doc},
        "config": {"write_empty_chunks": True},
    }


def packed_codecs_json(codec: PackedCodec) -> list[dict[str, Any]]:
    """The ``codecs`` of a ``rows`` array with the ``lzma`` compressor, exactly as its zarr.json holds them."""
    return [{"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "numcodecs.shuffle", "configuration": {"elementsize": np.dtype(codec.dtype).itemsize}},
            {"name": "numcodecs.lzma", "configuration": {"format": PACKED_LZMA_FORMAT,
                                                         "filters": packed_lzma_filters()}},
            {"name": "crc32c"}]


def packed_array_kwargs(meta: GroupMeta, root: RootMeta) -> dict[str, Any]:
    """Arguments for ``zarr.create_array`` of format 2's ``rows`` array."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    codec = meta.packed_codec()
    fields, L = codec.n_fields, root.max_shard_len
    if codec.compressor == "lzma":
        from zarr.codecs.numcodecs import LZMA, Shuffle

        compressors = [Shuffle(elementsize=np.dtype(codec.dtype).itemsize),
                       LZMA(format=PACKED_LZMA_FORMAT, filters=packed_lzma_filters()), Crc32cCodec()]
    else:
        compressors = [BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=PACKED.shuffle), Crc32cCodec()]
    return {
        "shape": (meta.epochs, root.num_shards, fields, L),
        "chunks": (1, 1, fields, L),
        "dtype": codec.dtype,
        "fill_value": 0,
        "serializer": BytesCodec(endian="little"),
        "compressors": compressors,
        "chunk_key_encoding": {"name": "default", "separator": CHUNK_SEPARATOR_2},
        "dimension_names": ("epoch", "shard", "field", "row"),
        "attributes": {"doc": PACKED.doc},
        "config": {"write_empty_chunks": True},
    }


def prior_array_kwargs(meta: GroupMeta) -> dict[str, Any]:
    """Arguments for ``zarr.create_array`` of the (C, C) ``tail_prior`` array."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    c = meta.num_classes
    return {
        "shape": (c, c), "chunks": (c, c), "dtype": "float32", "fill_value": 0.0,
        "compressors": [BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=PRIOR.shuffle), Crc32cCodec()],
        "chunk_key_encoding": {"name": "default", "separator": CHUNK_SEPARATOR_2},
        "dimension_names": ("top1_class", "class"), "attributes": {"doc": PRIOR.doc},
        "config": {"write_empty_chunks": True},
    }


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
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    @classmethod
    def from_topk(cls, topk: TopKLogits, view_params: np.ndarray, value_dtype: str) -> UnitRows:
        """The stored form of a unit's rows: top-k log-probabilities at T = 1 (``z − lse₁``, where float16 is most
        precise) in ``value_dtype``, the exact target log-probability and the log-partitions in float32."""
        lse1 = topk.lse[:, topk.temperatures.index(1.0)]
        return cls(
            topk_indices=topk.indices.numpy(),
            topk_logprobs=(topk.logits - lse1[:, None]).numpy().astype(value_dtype),
            target_logprob=topk.target_logprob.numpy().astype(np.float32),
            lse=topk.lse.numpy().astype(np.float32),
            view_params=np.asarray(view_params).astype(np.int16),
        )

    @classmethod
    def empty(cls, meta: GroupMeta) -> UnitRows:
        """The rows of a unit without views (every sample of its shard skipped)."""
        return cls(np.zeros((0, meta.k)), np.zeros((0, meta.k)), np.zeros(0), np.zeros((0, len(meta.temperatures))),
                   np.zeros((0, len(meta.param_fields))))

    def topk(self, meta: GroupMeta, targets=None, *, tail: TailRule | None = None) -> TopKLogits:
        """THE conversion of stored rows back into `TopKLogits` (every reader goes through here). ``targets``:
        the labels from the data (default zeros, for callers that set each row's target themselves). ``tail`` is
        format 2's (format 1 has one rule, uniform with the rest derived as 1 - Σ known)."""
        lse = torch.from_numpy(self.lse.astype(np.float32))
        logprobs = torch.from_numpy(self.topk_logprobs.astype(np.float32))
        n = len(self)
        target = torch.zeros(n, dtype=torch.int64) if targets is None else torch.as_tensor(
            np.asarray(targets), dtype=torch.int64)
        return TopKLogits(
            indices=torch.from_numpy(self.topk_indices.astype(np.int64)),
            logits=logprobs + lse[:, meta.temperatures.index(1.0), None],
            target=target,
            target_logprob=torch.from_numpy(self.target_logprob.astype(np.float32)),
            lse=lse, temperatures=meta.temperatures, num_classes=meta.num_classes,
        )

    def select(self, offsets) -> UnitRows:
        """The rows at ``offsets``."""
        o = np.asarray(offsets)
        return UnitRows(**{name: getattr(self, name)[o] for name in ARRAY_NAMES})




@dataclass
class PackedRows:
    """Format 2: one unit's views as the codec's (F, n) matrix (`labels.codecs.encode_topk`)."""

    matrix: np.ndarray

    def __len__(self) -> int:
        return self.matrix.shape[1]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {ROWS: self.matrix}


@dataclass
class PackedUnit:
    """Format 2: a unit read back and decoded (`labels.codecs.decode_unit`): ``n`` views."""

    fields: dict[str, np.ndarray]

    def __len__(self) -> int:
        return self.fields["indices"].shape[0]

    @property
    def view_params(self) -> np.ndarray:
        return self.fields["params"]

    def select(self, offsets) -> PackedUnit:
        o = np.asarray(offsets)
        return PackedUnit({name: a[o] for name, a in self.fields.items()})

    def topk(self, meta: GroupMeta, targets=None, *, tail: TailRule | None = None) -> TopKLogits:
        """THE conversion of format 2's decoded rows into `TopKLogits` (see `UnitRows.topk`)."""
        f = self.fields
        n = len(self)
        target = torch.zeros(n, dtype=torch.int64) if targets is None else torch.as_tensor(
            np.asarray(targets), dtype=torch.int64)

        def t(name, dtype=torch.float32):
            return torch.from_numpy(np.ascontiguousarray(f[name])).to(dtype) if name in f else None

        return TopKLogits(
            indices=t("indices", torch.int64), logits=t("logits"), target=target,
            target_logprob=t("target_logprob"), lse=t("lse"), temperatures=meta.temperatures,
            num_classes=meta.num_classes, log_rest=t("log_rest"), tail=UNIFORM if tail is None else tail,
            tail_indices=t("tail_indices", torch.int64), tail_logprobs=t("tail_logprobs"),
        )
