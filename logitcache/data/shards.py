"""Reading shards: the pipeline of small generator stages from a shard URL to decoded samples, and the
dataset that splits shards over ranks and DataLoader workers. Reading one shard (`iter_shard`)::

    open_url              fsspec (local path, file://, s3://, ...) or webdataset's gopen (pipe:);
                          size checked against the manifest (pipes: once read)
      ─► tar_stream       .tar.gz / .tgz decompressed on the fly (recognised by their bytes)
      ─► tar_members      (name, bytes)                 truncated tar     -> ShardFormatError  url:key
      ─► group_by_key     {"__key__", "__url__", ext: bytes}   duplicate key -> ShardFormatError  url:key
      ─► ShardCheck       key count + key digest        shard changed     -> ShardChangedError url
      ─► decode_sample    (uint8 (3, H, W) RGB, label)  bad image/label   -> BadSampleError    url:key
      ─► Sample(index = shard's first_index + offset, ...)

Only `BadSampleError` is skippable (``skip_bad=True``): the sample is counted in `SkipStats` and its global index
stays taken, so later indices never shift. Broken tar structure and changed shards always stop the run, because
the indices in that shard can no longer be trusted; re-fetch the shard, or leave it out with ``--shards``.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from webdataset.shardlists import split_by_worker

from logitcache.data.decode import DECODER, decode_sample
from logitcache.data.manifest import Manifest, ShardCheck, ShardInfo, file_size, load_manifest
from logitcache.data.split import split_shards
from logitcache.data.tar import group_by_key, open_url, tar_members, tar_stream
from logitcache.errors import (
    BadSampleError,
    DataError,
    ShardSelectionError,
)
from logitcache.runtime.dist import rank_and_world


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
    """Open a shard for streaming (`open_url`: fsspec, or webdataset's gopen for ``pipe:``); with ``check``, its
    size must match the manifest first (pipes: see `iter_shard`)."""
    if check is not None:
        check.check_size(file_size(url))
    return open_url(url)


class _CountingReader:
    def __init__(self, f):
        self.f, self.size = f, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.size += len(b)
        return b


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
    size = file_size(url)
    check.check_size(size)
    with open_url(url) as f:
        counted = _CountingReader(f)
        for offset, raw in enumerate(group_by_key(tar_members(tar_stream(counted), url), url)):
            check.add_key(raw["__key__"])
            try:
                image, label = decode_sample(raw, manifest.num_classes, decoder, label_key=manifest.label_key)
            except BadSampleError as e:
                if not skip_bad:
                    raise
                if stats is not None:
                    stats.add(e)
                continue
            yield Sample(info.first_index + offset, shard_index, offset, raw["__key__"], url, image, label)
        if size is None:  # a pipe: its size is known only now, once every byte went by
            while counted.read(1 << 16):
                pass
            check.check_size(counted.size)
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
        """The shards this rank and (inside a DataLoader worker) this worker read: this rank's part of the order
        (webdataset's ``split_by_node`` rule, with the rank given here), then webdataset's ``split_by_worker``;
        together `split_shards`. webdataset lets WORKER / NUM_WORKERS variables override the DataLoader's
        worker info; when they disagree with it, some shards would be read twice or never, so that is an error."""
        info = torch.utils.data.get_worker_info()
        if info is not None and "WORKER" in os.environ and "NUM_WORKERS" in os.environ:
            env = (os.environ["WORKER"], os.environ["NUM_WORKERS"])
            if env != (str(info.id), str(info.num_workers)):
                raise DataError(f"WORKER={env[0]} NUM_WORKERS={env[1]} in the environment contradict this DataLoader "
                                f"worker ({info.id} of {info.num_workers}); webdataset's split_by_worker would obey "
                                "the variables and read shards twice or never: unset them")
        return list(split_by_worker(itertools.islice(self.shard_order(), self.rank, None, self.world_size)))

    def num_samples(self) -> int:
        """Samples (including any later skipped) in this rank's shards, over all its workers."""
        mine = split_shards(self.shard_order(), self.rank, self.world_size)
        return sum(self.manifest.shards[s].num_samples for s in mine)

    def __iter__(self) -> Iterator[Any]:
        for s in self.assigned_shards():
            for sample in iter_shard(self.manifest, s, skip_bad=self.skip_bad, decoder=self.decoder):
                yield self.transform(sample) if self.transform is not None else sample


