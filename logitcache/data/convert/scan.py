"""Manifests for shards someone else made: webdataset shards as they are, local or remote.

``logitcache shards scan SOURCE`` where SOURCE is

  * a directory (path or fsspec URL): its ``*.tar``, ``*.tar.gz`` and ``*.tgz`` files, in natural name order;
  * a brace pattern, expanded by webdataset's ``expand_urls``: ``/data/imagenet-train-{000000..001281}.tar``,
    ``s3://bucket/train-{0000..0099}.tar.gz``, ``pipe:curl -s https://host/shard-{000..009}.tar``;
  * a URL list file (``.txt``): one shard path/URL per line, in order (blank lines and ``#`` comments skipped;
    relative paths are relative to the list file's directory).

Each shard is read once (`scan_shard`): size and sha256 of the file as stored (compressed for ``.tar.gz``), key
count, key digest, and the largest label, from ``.cls`` or, with ``label_key``, from a path into the ``.json``
member. ``workers`` scans shards in parallel processes (one shard per task; the manifest does not depend on
the worker count). Class names come from a file (`read_class_names`), synset folders
(`image_folder_classes`) or default to ``"0".."C-1"``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import fsspec
from webdataset.shardlists import expand_urls

from logitcache.cache.schema import MAX_CLASS_NAMES_BYTES, MAX_URL_LIST_BYTES
from logitcache.data.decode import sample_label
from logitcache.data.manifest import KeysDigest, Manifest, ShardInfo, manifest_url
from logitcache.data.tar import group_by_key, is_pipe, open_url, tar_members, tar_stream
from logitcache.errors import DataError, ManifestError
from logitcache.runtime.bounded import read_url_bounded

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass(frozen=True)
class ShardScan:
    """The facts one pass over a shard file yields."""

    size: int
    sha256: str
    num_samples: int
    keys_digest: str
    max_label: int  # -1 when no sample has an integer label


def scan_shard(url: str, *, label_key: str | None = None, allow_pipe: bool | None = None) -> ShardScan:
    """Read a shard once: sha256 + size of the file, its keys (count, digest), the largest integer label.

    Broken tar structure (truncated tar or gzip stream, bad header, no end-of-archive blocks, duplicate keys)
    raises `ShardFormatError` naming ``url:key``. Labels that do not parse are left for reading to report.
    """
    digest, max_label = KeysDigest(), -1
    with open_url(url, allow_pipe=allow_pipe) as raw:
        f = _HashingReader(raw)
        for sample in group_by_key(tar_members(tar_stream(f), url, require_end=True), url):
            digest.update(sample["__key__"])
            try:
                max_label = max(max_label, sample_label(sample, label_key))
            except ValueError:
                pass  # bad labels are reported when the sample is read, not here
        f.drain()
    return ShardScan(f.size, f.sha.hexdigest(), digest.count, digest.hexdigest(), max_label)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def list_shards(directory: str | os.PathLike) -> list[str]:
    """The ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` files directly in ``directory`` (path or URL), in natural order
    (shard-2 before shard-10)."""
    d = os.fspath(directory)
    if "://" not in d:
        d = os.path.abspath(d)
    fs, path = fsspec.core.url_to_fs(d)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(SHARD_SUFFIXES)]
    return [d.rstrip("/") + "/" + n for n in sorted(names, key=_natural_key)]


def expand_sources(source: str) -> list[str]:
    """Shard URLs from a directory, a brace pattern, a URL list file (``.txt``) or one shard (see the module)."""
    if is_pipe(source) or ("{" in source and "}" in source):
        urls = expand_urls(source)
        return [u if is_pipe(u) or "://" in u else os.path.abspath(u) for u in urls]
    if source.endswith(SHARD_SUFFIXES):
        return [source if "://" in source else os.path.abspath(source)]
    if source.endswith(".txt"):
        try:  # capped: a URL list is read whole (a hostile or mistaken multi-GB file is refused, not loaded)
            lines = read_url_bounded(source, MAX_URL_LIST_BYTES, what="URL list file",
                                     error=DataError).decode("utf-8").splitlines()
        except FileNotFoundError as e:
            raise DataError(f"{source}: no such URL list file") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: the URL list is not UTF-8 text ({e})") from e
        here = source.rsplit("/", 1)[0] if "/" in source else "."
        urls = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if is_pipe(line) or "://" in line or os.path.isabs(line):
                urls.append(line)
            elif "://" in here:
                urls.append(here.rstrip("/") + "/" + line)
            else:
                urls.append(os.path.abspath(os.path.join(here, line)))
        if not urls:
            raise DataError(f"{source}: the URL list names no shards")
        return urls
    fs, path = fsspec.core.url_to_fs(source if "://" in source else os.path.abspath(source))
    if not fs.isdir(path):
        raise DataError(f"{source}: neither a directory, a brace pattern like shard-{{000000..000009}}.tar, a URL "
                        f"list (.txt) nor a shard (.tar, .tar.gz, .tgz)")
    urls = list_shards(source)
    if not urls:
        raise DataError(f"{source}: no *.tar / *.tar.gz / *.tgz shards here")
    return urls


def default_manifest_dir(urls: Sequence[str]) -> str | None:
    """Where a manifest for these shards goes when no --out is given: their common directory (None for pipes)."""
    if any(is_pipe(u) for u in urls):
        return None
    dirs = {u.rsplit("/", 1)[0] for u in urls}
    return dirs.pop() if len(dirs) == 1 else None


def _scan_task(args: tuple[str, str | None, bool | None]) -> ShardScan:
    url, label_key, allow_pipe = args
    return scan_shard(url, label_key=label_key, allow_pipe=allow_pipe)


def scan_shards(urls: Sequence[str], *, label_key: str | None = None, workers: int = 1,
                allow_pipe: bool | None = None) -> list[ShardScan]:
    """`scan_shard` for each URL, in order; ``workers > 1`` scans in that many processes (one shard a task)."""
    tasks = [(u, label_key, allow_pipe) for u in urls]
    if workers <= 1 or len(urls) <= 1:
        return [_scan_task(t) for t in tasks]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(urls)), mp_context=ctx) as pool:
        return list(pool.map(_scan_task, tasks))


def build_manifest(
    shard_urls: Sequence[str],
    class_names: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    base_url: str | None = None,
    label_key: str | None = None,
    workers: int = 1,
    allow_pipe: bool | None = None,
) -> Manifest:
    """Scan shards someone else made (in the order given) into a manifest.

    Class names default to ``"0".."C-1"`` with C = ``num_classes`` or, failing that, the largest label + 1.
    Shard names are stored relative to ``base_url`` (default: the first shard's directory) when under it;
    ``pipe:`` URLs and shards elsewhere are stored as they are. ``label_key``: labels are read from this path in
    each sample's ``.json`` member (recorded in the manifest). ``workers``: parallel scanning processes.
    """
    if not shard_urls:
        raise ManifestError("no shards to build a manifest from")
    urls = [os.fspath(u) if is_pipe(os.fspath(u)) or "://" in os.fspath(u) else os.path.abspath(u)
            for u in shard_urls]
    if base_url is None:
        base_url = default_manifest_dir(urls)
        if base_url is None:
            raise ManifestError("these shards have no common directory: say where the manifest goes (--out)")
    base = base_url.rstrip("/")
    if "://" not in base:
        base = os.path.abspath(base)
    scans = scan_shards(urls, label_key=label_key, workers=workers, allow_pipe=allow_pipe)
    infos, first, max_label = [], 0, -1
    for url, scan in zip(urls, scans, strict=True):
        name = url[len(base) + 1 :] if url.startswith(base + "/") else url
        infos.append(ShardInfo(name, scan.size, scan.sha256, scan.num_samples, scan.keys_digest, first))
        first += scan.num_samples
        max_label = max(max_label, scan.max_label)
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if num_classes is not None and num_classes != len(names):
            raise ManifestError(f"{len(names)} class names given but num_classes={num_classes}")
        if max_label >= len(names):
            raise ManifestError(f"a label is {max_label}, but only {len(names)} class names are given")
    else:
        n = num_classes if num_classes is not None else max_label + 1
        if n < 1:
            where = f"'{label_key}' in .json" if label_key else ".cls"
            raise ManifestError(f"no integer labels found ({where}): give the class names or the number of classes")
        names = tuple(str(i) for i in range(n))
    return Manifest(tuple(infos), names, base, label_key)


# ------------------------------------------------------------------ class names
def read_class_names(path: str) -> list[str]:
    """Class names from a file: a JSON list (index = position), a JSON object mapping index -> name or
    index -> [id, name] (Keras' ``imagenet_class_index.json``: the id, e.g. the WordNet synset, is taken), or a text
    file with one name per line (lines that all start with a WordNet synset, as ImageNet's
    ``LOC_synset_mapping.txt`` ``n01440764 tench, Tinca tinca``, give their synsets)."""
    try:
        text = read_url_bounded(path, MAX_CLASS_NAMES_BYTES, what="class-names file", error=DataError).decode("utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such class-names file") from e
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        if isinstance(obj, dict):
            if not all(re.fullmatch(r"\d+", str(k)) for k in obj) or sorted(map(int, obj)) != list(range(len(obj))):
                raise DataError(f"{path}: a JSON object of class names needs the keys 0..{len(obj) - 1}")
            obj = [obj[k] for k in sorted(obj, key=int)]
        if not isinstance(obj, list) or not obj:
            raise DataError(f"{path}: expected a JSON list of class names (or an object index -> name)")
        names = [str(v[0]) if isinstance(v, list) and v else str(v) for v in obj]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if all(re.match(r"n\d{8}(\s|$)", n) for n in names):  # LOC_synset_mapping.txt: "n01440764 tench, ..."
            names = [n.split()[0] for n in names]
    if not names:
        raise DataError(f"{path}: no class names in it")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise DataError(f"{path}: class names repeat ({', '.join(dup)})")
    return names


def scan_source(source: str, *, out: str | None = None, class_names: Sequence[str] | None = None,
                num_classes: int | None = None, label_key: str | None = None, workers: int = 1,
                force: bool = False) -> tuple[Manifest, str]:
    """What ``logitcache shards scan`` does: expand SOURCE (`expand_sources`), scan every shard, write the
    manifest to ``out`` (a directory or a ``.json`` path; default: the shards' directory) and return it with its
    URL. An existing manifest is kept unless ``force``. ``pipe:`` URLs run: the user typed them."""
    urls = expand_sources(source)
    where = out if out is not None else default_manifest_dir(urls)
    if where is None:
        raise DataError("these shards have no common directory (pipe: URLs, or several folders): say where the "
                        "manifest goes with --out")
    target = manifest_url(where)
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path) and not force:
        raise ManifestError(f"{target} exists; pass --force to replace it")
    m = build_manifest(urls, class_names, num_classes=num_classes, base_url=target.rsplit("/", 1)[0],
                       label_key=label_key, workers=workers, allow_pipe=True)
    m.save(target)
    return m, target


__all__ = [
    "ShardScan",
    "build_manifest",
    "default_manifest_dir",
    "expand_sources",
    "list_shards",
    "read_class_names",
    "scan_shard",
    "scan_shards",
    "scan_source",
]
