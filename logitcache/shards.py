"""ImageNet-style webdataset shards: a reading pipeline of small generator stages, the rank/worker split, and
deterministic shard writing (from any sample iterator, the Fashion-MNIST IDX files, or an ImageFolder tree).

A shard is a tar file. A sample is the run of members sharing a key (the member path up to the first dot of its
basename, webdataset's convention): ``<key>.jpg`` (or ``.png`` / ``.jpeg`` / ``.webp``) and ``<key>.cls``, the
class index as decimal text. Reading one shard (`iter_shard`)::

    open_shard            fsspec (local path, file://, s3://, ...); size checked against the manifest
      ─► tar_members      (name, bytes)                 truncated tar     -> ShardFormatError  url:key
      ─► group_by_key     {"__key__", "__url__", ext: bytes}   duplicate key -> ShardFormatError  url:key
      ─► ShardCheck       key count + key digest        shard changed     -> ShardChangedError url
      ─► decode_sample    (uint8 (3, H, W) RGB, label)  bad image/label   -> BadSampleError    url:key
      ─► Sample(index = shard's first_index + offset, ...)

Only `BadSampleError` is skippable (``skip_bad=True``): the sample is counted in `SkipStats` and its global index
stays taken, so later indices never shift. Broken tar structure and changed shards always stop the run, because
the indices in that shard can no longer be trusted; re-fetch the shard, or leave it out with ``--shards``.

Decoder: ``torchvision.io.decode_image`` (libjpeg-turbo), measured 1.5x faster than PIL on 500x375 JPEGs with
bit-identical pixels (``pipelines/bench_data.py`` re-measures both). PIL is the fallback (16-bit PNGs, and
torchvision versions without image decoding).
"""

from __future__ import annotations

import gzip
import io
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from logitcache.errors import (
    BadSampleError,
    DataError,
    LogitcacheError,
    ShardFormatError,
    ShardSelectionError,
)
from logitcache.manifest import KeysDigest, Manifest, ShardCheck, ShardInfo, file_size, load_manifest

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
DECODER = "torchvision"  # or "pil"; see the module docstring

# torchvision 0.29 marks its decoders deprecated (in favour of torchcodec) but is pinned here and still the
# fastest; the warning would otherwise repeat for every image under pytest's default filters.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


# ------------------------------------------------------------------ records
@dataclass
class Sample:
    """One decoded sample. ``index`` is global (stable across splits), ``offset`` its position in its shard."""

    index: int
    shard: int
    offset: int
    key: str
    url: str
    image: torch.Tensor  # uint8 (3, H, W) RGB
    label: int

    @property
    def where(self) -> str:
        return f"{self.url}:{self.key}"


@dataclass
class SkipStats:
    """What skip mode skipped: a count, counts per kind of problem, and ``url:key: reason`` lines."""

    count: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def add(self, err: BadSampleError) -> None:
        self.count += 1
        self.by_kind[err.kind] = self.by_kind.get(err.kind, 0) + 1
        self.samples.append(str(err))

    def merge(self, other: SkipStats) -> SkipStats:
        self.count += other.count
        for k, v in other.by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + v
        self.samples.extend(other.samples)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "by_kind": dict(self.by_kind), "samples": list(self.samples)}

    def __str__(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.by_kind.items()))
        return f"{self.count} sample(s) skipped" + (f" ({kinds})" if kinds else "")


# ------------------------------------------------------------------ reading stages
def open_shard(url: str, check: ShardCheck | None = None):
    """Open a shard for streaming through fsspec; with ``check``, its size must match the manifest first."""
    if check is not None:
        check.check_size(file_size(url))
    return fsspec.open(url, "rb").open()


def tar_members(fileobj, url: str) -> Iterator[tuple[str, bytes]]:
    """Stage: ``(member name, bytes)`` for each regular file of a tar stream, in order.

    A small streaming reader of the tar formats shards come in (ustar, GNU long names, POSIX/PAX headers),
    about 6x faster than ``tarfile``'s stream mode per member. Headers are checksummed. A truncated tar or a
    bad header raises `ShardFormatError` naming the shard and the last key read. A stream that ends exactly
    at a member boundary ends the iteration (the manifest's size and count checks catch that truncation).
    """
    last_key, offset = "-", 0
    long_name: str | None = None  # from a GNU 'L' member or a PAX 'path' record, for the next member
    pax_size: int | None = None

    def fail(what: str) -> ShardFormatError:
        where = "after this key" if last_key != "-" else "before its first sample"
        return ShardFormatError(f"{url}:{last_key}: truncated or corrupt tar {where}, at byte {offset} ({what})")

    try:
        while True:
            header = _read_exact(fileobj, _BLOCK)
            if not header:
                if offset == 0:
                    raise fail("empty file")
                return
            if len(header) < _BLOCK:
                raise fail(f"a {len(header)}-byte header")
            if header == _ZERO_BLOCK:
                return  # end-of-archive
            if not _tar_checksum_ok(header):
                raise fail("header checksum mismatch")
            typeflag = header[156:157]
            size = pax_size if pax_size is not None and typeflag in _REGULAR else _tar_number(header[124:136])
            if size < 0:
                raise fail(f"member size {size}")
            data = _read_exact(fileobj, size)
            padding = _read_exact(fileobj, -size % _BLOCK)
            if len(data) < size or len(padding) < -size % _BLOCK:
                name = long_name if long_name is not None else _ustar_name(header)
                raise fail(f"member {name!r} has {len(data)} of its {size} bytes")
            offset += _BLOCK + size + len(padding)
            if typeflag == b"L":  # GNU long name of the next member
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif typeflag == b"x":  # PAX extended header of the next member
                records = _pax_records(data)
                long_name = records.get("path", long_name)
                pax_size = int(records["size"]) if "size" in records else None
            elif typeflag in (b"g", b"K"):
                pass  # PAX global header, GNU long link name: nothing a sample needs
            else:
                name = long_name if long_name is not None else _ustar_name(header)
                long_name, pax_size = None, None
                if typeflag in _REGULAR:
                    last_key = split_member_name(name)[0] or name
                    yield name, data
    except (OSError, ValueError, EOFError) as e:
        raise fail(f"{type(e).__name__}: {e}") from e


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")


def _read_exact(f, n: int) -> bytes:
    """Read n bytes, looping over short reads; fewer only at the end of the stream."""
    if n == 0:
        return b""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal ASCII (NUL/space padded), or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _tar_checksum_ok(header: bytes) -> bool:
    """The header's checksum field equals the sum of its bytes with that field read as spaces (unsigned, or
    the historical signed-char sum)."""
    recorded = _tar_number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if recorded == unsigned:
        return True
    high = sum(b >= 128 for b in header[:148]) + sum(b >= 128 for b in header[156:])
    return recorded == unsigned - 256 * high


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a path prefix (GNU "ustar  " uses that area otherwise)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad PAX record length")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_MEMBER_RE = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``"dir/abc.seg.png" -> ("dir/abc", "seg.png")``; ``(None, None)`` for names that are not sample parts
    (no extension, or a hidden basename such as macOS ``._abc.jpg``)."""
    m = _MEMBER_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def group_by_key(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Stage: consecutive members with the same key -> one raw sample ``{"__key__", "__url__", ext: bytes}``.

    Extensions are lower-cased. A key that appears again after other keys, or one extension twice, raises
    `ShardFormatError` (a duplicate key would make global indices ambiguous).
    """
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    for name, data in members:
        key, ext = split_member_name(name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            if key in seen:
                raise ShardFormatError(f"{url}:{key}: duplicate key (it appears again after other keys)")
            seen.add(key)
            current = {"__key__": key, "__url__": url}
        elif ext in current:
            raise ShardFormatError(f"{url}:{key}: duplicate key (two .{ext} members)")
        current[ext] = data
    if current is not None:
        yield current


def parse_label(data: bytes | None) -> int:
    """The integer in a ``.cls`` member; ValueError (with the reason) when missing or not an integer."""
    if data is None:
        raise ValueError("no .cls label")
    text = data.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f".cls is not an integer: {text[:32]!r}")
    return int(text)


def decode_image(data: bytes, decoder: str = DECODER) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W) RGB (grayscale/CMYK/palette converted, alpha dropped). Raises on bad bytes."""
    if not data:
        raise ValueError("empty image")
    if decoder == "torchvision" and _tv_decode is not None:
        try:
            x = _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_TV_RGB)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[-1]) from e
        if x.dtype == torch.uint8:
            return x
        # 16-bit PNG: let PIL do its conversion rather than inventing one
    elif decoder not in ("torchvision", "pil"):
        raise ValueError(f"unknown decoder {decoder!r}; use 'torchvision' or 'pil'")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # channels-last memory, as torchvision decodes


try:  # torchvision without image ops (or a future one without them) falls back to PIL
    from torchvision.io import ImageReadMode as _ImageReadMode
    from torchvision.io import decode_image as _tv_decode
    from torchvision.io.image import _has_image_ops

    _TV_RGB = _ImageReadMode.RGB
    if not _has_image_ops():
        _tv_decode = None
except ImportError:  # pragma: no cover
    _tv_decode, _TV_RGB = None, None


def decode_sample(raw: dict[str, Any], num_classes: int, decoder: str = DECODER) -> tuple[torch.Tensor, int]:
    """Stage body: a raw sample -> ``(image, label)``; any problem raises `BadSampleError` naming url:key."""
    url, key = raw["__url__"], raw["__key__"]
    try:
        label = parse_label(raw.get("cls"))
    except ValueError as e:
        raise BadSampleError(url, key, str(e), "bad label" if "cls" in raw else "no label") from None
    if not 0 <= label < num_classes:
        raise BadSampleError(url, key, f"label {label} outside [0, {num_classes})", "label out of range")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        parts = sorted(k for k in raw if not k.startswith("__"))
        raise BadSampleError(url, key, f"no image (.jpg/.jpeg/.png/.webp); members: {parts}", "no image")
    try:
        image = decode_image(raw[ext], decoder)
    except Exception as e:  # every decoder failure (PIL raises many types) is this sample's fault
        raise BadSampleError(url, key, f"cannot decode .{ext}: {type(e).__name__}: {e}", "bad image") from None
    return image, label


def iter_shard(
    manifest: Manifest | str,
    shard_index: int,
    *,
    skip_bad: bool = False,
    stats: SkipStats | None = None,
    decoder: str = DECODER,
) -> Iterator[Sample]:
    """Decoded samples of one shard, in order, checked against the manifest (size at open, keys at the end).

    ``skip_bad``: samples with bad bytes (`BadSampleError`) are left out and added to ``stats``; their global
    indices stay taken. The end-of-shard check runs only when the shard is read to the end.
    """
    manifest = load_manifest(manifest)
    info: ShardInfo = manifest.shards[shard_index]
    url = manifest.shard_url(shard_index)
    check = ShardCheck(info, url)
    with open_shard(url, check) as f:
        for offset, raw in enumerate(group_by_key(tar_members(f, url), url)):
            check.add_key(raw["__key__"])
            try:
                image, label = decode_sample(raw, manifest.num_classes, decoder)
            except BadSampleError as e:
                if not skip_bad:
                    raise
                if stats is not None:
                    stats.add(e)
                continue
            yield Sample(info.first_index + offset, shard_index, offset, raw["__key__"], url, image, label)
    check.finish()


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Stage: a bounded shuffle (reservoir of ``size`` items) with an explicit RNG, e.g. ``random.Random(seed)``."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------ selections and the rank/worker split
def parse_shard_selection(text: str | None, num_shards: int | None = None) -> list[int]:
    """``"0-9"`` (inclusive), ``"0,3,5"``, ``"0-3,7"`` -> sorted unique shard indices.

    ``None``/``""``/``"all"`` means every shard (needs ``num_shards``). With ``num_shards``, indices past the
    last shard raise `ShardSelectionError`.
    """
    if text is None or text.strip() in ("", "all"):
        if num_shards is None:
            raise ShardSelectionError("selecting all shards needs the number of shards")
        return list(range(num_shards))
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ShardSelectionError(f"--shards {text!r}: {part!r} is not an index or a range like 0-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ShardSelectionError(f"--shards {text!r}: range {part.strip()!r} runs backwards")
        out.update(range(a, b + 1))
    if num_shards is not None and max(out) >= num_shards:
        raise ShardSelectionError(f"--shards {text!r}: shard {max(out)} does not exist "
                                  f"(the dataset has shards 0-{num_shards - 1})")
    return sorted(out)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)``: explicit values, else torchrun's RANK/WORLD_SIZE, else an
    initialised torch.distributed group, else ``(0, 1)``."""
    if world_size is None:
        if "WORLD_SIZE" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = 1
    if rank is None:
        if "RANK" in os.environ:
            rank = int(os.environ["RANK"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size} is not a valid split")
    return rank, world_size


def split_shards(shards: Sequence[int], rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[int]:
    """The shards one (rank, worker) reads: ``shards[rank::world_size][worker::num_workers]``.

    Every shard goes to exactly one (rank, worker). With fewer shards than ranks x workers, some readers get
    none; nothing is repeated or padded, so ranks may see different sample counts (a DDP loop must allow
    for that, e.g. with ``torch.distributed.algorithms.Join`` or by giving each rank whole shards).
    """
    return list(shards)[rank::world_size][worker::num_workers]


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of the selected shards, split over torchrun ranks and DataLoader workers at shard level.

    Each (rank, worker) reads `split_shards` of the shard order; with ``shuffle_seed`` the order is a
    permutation drawn from ``(shuffle_seed, epoch)``, the same on every rank, so the split stays exact.
    Call ``set_epoch`` before each epoch (workers must be re-created, i.e. ``persistent_workers=False``).
    ``transform(sample)`` runs in the worker (a picklable, module-level function where workers are spawned),
    e.g. one returning ``(sample.index, sample.image, sample.label)``.
    Skipped-sample counts live in the workers; count them as manifest length minus samples seen.
    """

    def __init__(
        self,
        manifest: Manifest | str,
        shards: Sequence[int] | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        skip_bad: bool = False,
        transform: Callable[[Sample], Any] | None = None,
        shuffle_seed: int | None = None,
        epoch: int = 0,
        decoder: str = DECODER,
    ):
        super().__init__()
        self.manifest = load_manifest(manifest)
        n = len(self.manifest.shards)
        self.shards = list(range(n)) if shards is None else list(shards)
        bad = [s for s in self.shards if not 0 <= s < n]
        if bad:
            raise ShardSelectionError(f"shards {bad} do not exist (the dataset has shards 0-{n - 1})")
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.skip_bad, self.transform, self.decoder = skip_bad, transform, decoder
        self.shuffle_seed, self.epoch = shuffle_seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self) -> list[int]:
        if self.shuffle_seed is None:
            return list(self.shards)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.shuffle_seed, self.epoch])))
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def assigned_shards(self) -> list[int]:
        """The shards this rank and (inside a DataLoader worker) this worker read."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return split_shards(self.shard_order(), self.rank, self.world_size, worker, num_workers)

    def num_samples(self) -> int:
        """Samples (including any later skipped) in this rank's shards, over all its workers."""
        mine = split_shards(self.shard_order(), self.rank, self.world_size)
        return sum(self.manifest.shards[s].num_samples for s in mine)

    def __iter__(self) -> Iterator[Any]:
        for s in self.assigned_shards():
            for sample in iter_shard(self.manifest, s, skip_bad=self.skip_bad, decoder=self.decoder):
                yield self.transform(sample) if self.transform is not None else sample


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
    manifest = Manifest(tuple(infos), tuple(str(c) for c in class_names), out_s)
    manifest.save(out_s)
    return manifest


# ------------------------------------------------------------------ Fashion-MNIST (IDX files)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DEFAULT_SRC = "/usr/share/datasets/fashion-mnist/"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or raw) of unsigned bytes as a numpy array; a malformed file raises DataError."""
    p = os.fspath(path)
    try:
        with (gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{p}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{p}: IDX header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{p}: IDX body has {len(body)} bytes, shape {shape} needs {int(np.prod(shape))}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(src: str, name: str) -> str:
    for candidate in (os.path.join(src, name + ".gz"), os.path.join(src, name)):
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{src}: no {name}(.gz) here (expected the Fashion-MNIST IDX files)")


def fashion_mnist_samples(src: str | os.PathLike, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {"png", "cls"})`` for a split ("train"/"test"), in file order; images as lossless grayscale PNG."""
    from PIL import Image

    src = os.fspath(src)
    images_file, labels_file = (_find(src, n) for n in _FASHION_MNIST_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_file} {images.shape} and {labels_file} {labels.shape} do not pair up")
    for i in range(len(images)):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        yield f"{split}-{i:06d}", {"png": buf.getvalue(), "cls": str(int(labels[i])).encode()}


def write_fashion_mnist(
    src: str | os.PathLike = FASHION_MNIST_DEFAULT_SRC,
    out: str | os.PathLike = "fashion-mnist",
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Shards for both splits: ``OUT/train`` and ``OUT/test``, each with its manifest."""
    out = os.fspath(out).rstrip("/")
    return {
        split: write_shards(
            fashion_mnist_samples(src, split), f"{out}/{split}", class_names=FASHION_MNIST_CLASSES,
            samples_per_shard=samples_per_shard, max_bytes=max_bytes, overwrite=overwrite,
        )
        for split in ("train", "test")
    }


# ------------------------------------------------------------------ ImageFolder trees (ImageNet train/<wnid>/*.JPEG)
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def sniff_image_type(data: bytes) -> str | None:
    """The extension the bytes really are (ImageNet has a PNG named .JPEG): jpg, png, webp or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_folder_classes(src: str | os.PathLike) -> list[str]:
    """Class names = the sorted subdirectory names of ``src`` (hidden ones left out); index = position."""
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a directory")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{src}: no class subdirectories (expected SRC/<class>/<image>)")
    return classes


def image_folder_samples(
    src: str | os.PathLike, *, shuffle_seed: int | None = 0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {"jpg"|"png"|"webp", "cls"})`` for every image under ``src/<class>/`` (recursively).

    Bytes are copied as they are (never re-encoded); the extension follows the bytes, not the file name.
    Key = ``<class>/<path without extension>`` with dots replaced by ``_``. Files are listed in sorted order,
    then shuffled with ``shuffle_seed`` (None: keep class order) so that each shard mixes classes.
    """
    src = os.fspath(src)
    classes = image_folder_classes(src)
    files: list[tuple[str, str, int]] = []
    for label, cls in enumerate(classes):
        root = os.path.join(src, cls)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.lower().endswith(FOLDER_EXTENSIONS) and not fn.startswith("."):
                    path = os.path.join(dirpath, fn)
                    rel = os.path.splitext(os.path.relpath(path, src))[0].replace(os.sep, "/")
                    files.append((path, rel.replace(".", "_"), label))
    if not files:
        raise DataError(f"{src}: no images ({'/'.join(FOLDER_EXTENSIONS)}) under its class directories")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
        files = [files[i] for i in order]
    for path, key, label in files:
        with open(path, "rb") as f:
            data = f.read()
        ext = sniff_image_type(data)
        if ext is None:
            raise DataError(f"{path}: not a JPEG, PNG or WebP file (starts with {data[:8].hex()})")
        yield key, {ext: data, "cls": str(label).encode()}


def write_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
) -> Manifest:
    """Shards + manifest from an ImageFolder tree; class index = sorted class-directory order."""
    return write_shards(
        image_folder_samples(src, shuffle_seed=shuffle_seed), out, class_names=image_folder_classes(src),
        samples_per_shard=samples_per_shard, max_bytes=max_bytes, overwrite=overwrite,
    )


__all__ = [
    "DECODER",
    "FASHION_MNIST_CLASSES",
    "Sample",
    "ShardDataset",
    "SkipStats",
    "decode_image",
    "decode_sample",
    "fashion_mnist_samples",
    "group_by_key",
    "image_folder_samples",
    "iter_shard",
    "parse_label",
    "parse_shard_selection",
    "rank_and_world",
    "read_idx",
    "shuffle_buffer",
    "split_shards",
    "tar_members",
    "write_fashion_mnist",
    "write_image_folder",
    "write_shards",
]
