"""Stage 2's data: replay the views a cache recorded (or draw fresh ones) and pair each with its soft labels.

    shards ─► shard order from (shuffle_seed, epoch) ─► whole shards split over ranks, then over the rank's
              `streams` S (or, streams=None, over its DataLoader workers)
      ─► per shard: read the unit (cached_epoch(e), shard) ONCE  (CacheReader.read_unit)
      ─► per sample:  params = unit.view_params[offset]                                  # what the dump drew
                      image  = UnitMixer(stored=params): apply_view, and for mixing recipes
                               the mix with the stored partner of the same unit          # the teacher's pixels
                      row    = the unit's TopKLogits row at `offset`                       # its soft labels
      ─► per stream: shuffle buffer seeded by (shuffle_seed, epoch, rank, stream) ─► its own batches (`collate`)
      ─► the streams' batches round robin (stream 0 .. S-1, skipping those that ran out)

With ``streams=S`` (and ``batch_size``) the data order is a pure function of (shuffle_seed, epoch, rank count,
S): `stream_batches` gives the same batches for 0 DataLoader workers or any count dividing S (worker w hosts
streams w, w+W, ... and yields their batches in the round-robin order; PyTorch's in-order DataLoader takes one
item from each worker in turn). ``train`` uses it (``--streams``), so a resumed run sees the batches an
uninterrupted one would, whatever ``--workers``. Without streams (``DataLoader(views, batch_size, num_workers)``)
each worker is a stream and the order depends on the worker count.

`FreshViews` is the same stage without a cache: it draws the views with ``sample_view(view_rng(seed, epoch,
index))`` — the dump's own sampling — so online KD and teacher-free training see the view distribution a cache
holds (the very same views when the seeds are equal).

For people with their own training loop::

    from torch.utils.data import DataLoader
    from logitcache.replay import CachedViews, collate, stream_batches
    from logitcache.labels import teacher_log_probs

    for epoch in range(epochs):
        views = CachedViews("data/train", "cache.zarr", epoch=epoch, shuffle_seed=0)
        for images, teacher, target in DataLoader(views, batch_size=128, num_workers=8, collate_fn=collate):
            # images: uint8 (N, 3, S, S), the exact pixels the teacher saw; normalise them for your student
            # teacher: TopKLogits (N rows); teacher_log_probs(teacher, T) gives dense (N, C) log-probabilities
            ...

    # the same batches whatever the worker count (0 or a divisor of streams):
    views = CachedViews("data/train", "cache.zarr", epoch=epoch, shuffle_seed=0, batch_size=128, streams=8)
    for images, teacher, target in stream_batches(views, num_workers=4):
        ...

Several views per decode (``views_per_decode=N``, `train --views-per-decode`): a dataset made for epoch
``e`` (a multiple of N) yields a *pass*: each image is decoded once and yields its views for epochs e … e+N-1
(cached epochs ``(e + j) mod E``; N must divide E), spread by `logitcache.data.spread` so that no batch of
``batch_size`` (give the DataLoader's) holds two views of one image::

    for first in range(0, epochs, 4):
        views = CachedViews("data/train", "cache.zarr", epoch=first, shuffle_seed=0, views_per_decode=4,
                            batch_size=128)
        for images, teacher, target in DataLoader(views, batch_size=128, num_workers=8, collate_fn=collate):
            ...   # 4 epochs' worth of views: every (image, epoch) view exactly once

Samples the dump skipped as corrupt have no teacher row (their rows are zero padding): they are left out,
never trained on. Under torchrun, ranks read disjoint whole shards, so they may see different sample counts.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from logitcache.cache.reader import CacheReader, UnitTable
from logitcache.cache.store import format_shards
from logitcache.cache.verify import check_replay
from logitcache.data.decode import decode_sample
from logitcache.data.manifest import Manifest, ShardCheck, load_manifest
from logitcache.data.shards import ShardDataset, iter_shard, shuffle_buffer
from logitcache.data.split import split_shards
from logitcache.data.spread import spread_possible, spread_stream, spread_views, window_plan
from logitcache.errors import BadSampleError, CacheError, CacheMismatchError, DataError
from logitcache.labels.topk import TopKLogits
from logitcache.views.mixing import UnitMixer, mixed_targets
from logitcache.views.recipe import Recipe, get_recipe, view_source

#: samples a stream (a DataLoader worker without ``streams``) holds back to shuffle across shard boundaries
DEFAULT_SHUFFLE_BUFFER = 1000
#: `train --streams` default: the data order's readers per rank; DataLoader worker counts dividing it (0, 1, 2, 4,
#: 8 — the ``--workers`` defaults up to 8 cores per process) give the same order
DEFAULT_STREAMS = 8


class ReplayItem(NamedTuple):
    """One training sample as the loop sees it."""

    image: torch.Tensor  # uint8 (3, S, S): the view's pixels, before normalisation
    soft: TopKLogits | None  # one row of soft labels (a teacher's, or PS-KD's previous prediction), or None
    target: int
    index: int  # global sample index
    view: np.ndarray  # int16 (P,) the view's params, in Recipe.param_fields order
    partner_target: int = -1  # mixing recipes: the label of the view mixed in (= target when not mixed)
    lam: float = 1.0  # the weight of `target` in the mixed label (1.0 when not mixed)
    epoch: int = -1  # the training epoch whose view this is (with views_per_decode N, one of the pass's N)


# ------------------------------------------------------------------ collate
def collate(items: Sequence[tuple]) -> tuple:
    """Batch a list of samples column by column: images stacked, `TopKLogits` rows concatenated, ints and
    arrays to tensors, a column of ``None`` stays ``None``. Works for any tuple (e.g. ``(image, row, target)``)
    and keeps the tuple's type (`ReplayItem` batches come back as `ReplayItem`s of batched columns)."""
    if not items:
        raise ValueError("collate needs at least one sample")
    columns = [_collate_column(list(col)) for col in zip(*items, strict=True)]
    first = items[0]
    return type(first)(*columns) if hasattr(first, "_fields") else tuple(columns)


def _collate_column(col: list) -> Any:
    first = col[0]
    if first is None:
        if any(c is not None for c in col):
            raise ValueError("cannot batch a column holding both None and values")
        return None
    if isinstance(first, TopKLogits):
        return TopKLogits.cat(col)
    if isinstance(first, torch.Tensor):
        return torch.stack(col)
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(col))
    return torch.tensor(col)


# ------------------------------------------------------------------ streams: an order independent of the workers
def check_workers(num_workers: int, streams: int) -> None:
    """Refuse (ValueError) a worker count that does not divide the stream count: each DataLoader worker hosts
    whole streams (w, w+W, ...), which is what keeps the batch order the same for every such count."""
    if num_workers > 1 and streams % num_workers:
        ok = [d for d in range(1, streams + 1) if streams % d == 0]
        raise ValueError(f"{num_workers} DataLoader workers cannot share {streams} streams evenly (each worker hosts "
                         f"whole streams, so the data order does not depend on the worker count): use --workers "
                         f"0 or one of {ok}, or start the run with a --streams that {num_workers} divides")


def round_robin(streams: Sequence[Iterator[Any]], *, keep_slots: bool) -> Iterator[Any]:
    """One item of each stream per round, streams in order, skipping exhausted ones. ``keep_slots``: yield None in
    an exhausted stream's slot while a later item follows (never trailing), so that a consumer taking this
    iterator's items round robin with other workers' keeps the global slot order."""
    live, held, end = list(streams), 0, object()
    while any(it is not None for it in live):
        for j, it in enumerate(live):
            item = end if it is None else next(it, end)
            if item is end:
                live[j], held = None, held + 1
                continue
            if keep_slots:
                yield from [None] * held
            held = 0
            yield item


def stream_batches(views: torch.utils.data.IterableDataset, *, num_workers: int = 0,
                   **loader_kwargs: Any) -> Iterator[Any]:
    """The batches of a dataset made with ``streams=S`` (and its ``batch_size``), in the streams' round-robin
    order whatever ``num_workers`` (0 or a divisor of S): a ``DataLoader(views, batch_size=None, num_workers=...)``
    whose placeholder slots are dropped. PyTorch's in-order DataLoader takes item i from worker i mod W (skipping
    workers that are done), and worker w yields the slots w, w+W, ... of the round robin over the S streams."""
    check_workers(num_workers, views.streams)
    loader = torch.utils.data.DataLoader(views, batch_size=None, num_workers=num_workers, **loader_kwargs)
    return (batch for batch in loader if batch is not None)


# ------------------------------------------------------------------ is this cache for this data and recipe?
def check_cache_matches(reader: CacheReader, manifest: Manifest | str, recipe: Recipe | None = None) -> Recipe:
    """Refuse (`CacheMismatchError`) a cache made from other data or with another view recipe; return the recipe
    to replay with (the cache's own when ``recipe`` is None).

    Data: the cache's dataset fingerprint must equal the manifest's; when it does not, the message names each
    shard whose name, sample count, key digest, sha256 or size differ (compared with the manifest stored in
    the cache). Recipe: every setting (name, version, image size, scale, pad, ...) must be equal; the message
    names each one that differs.
    """
    manifest = load_manifest(manifest)
    root = reader.root_meta
    if root.dataset_fingerprint != manifest.fingerprint:
        raise CacheMismatchError(
            f"cache {reader.url} was made from other data than {manifest.base_url or 'the data given'} "
            f"(dataset fingerprint {root.dataset_fingerprint[:16]}… != {manifest.fingerprint[:16]}…):\n  "
            + "\n  ".join(_dataset_differences(reader, manifest))
        )
    lengths = tuple(s.num_samples for s in manifest.shards)
    if root.shard_lengths != lengths or root.num_classes != manifest.num_classes:
        raise CacheMismatchError(
            f"cache {reader.url}: its root metadata (zarr.json) declares {root.num_shards} shards of "
            f"{_short(list(root.shard_lengths))} samples and {root.num_classes} classes, but its dataset "
            f"fingerprint is that of data with {len(lengths)} shards of {_short(list(lengths))} samples and "
            f"{manifest.num_classes} classes: the metadata was edited; refusing it")
    cached = Recipe.from_json(reader.meta.recipe)
    if recipe is None:
        return cached

    wanted, have = recipe.to_json(), cached.to_json()
    diff = [
        f"{key}: cache has {have.get(key)!r}, requested {wanted.get(key)!r}"
        for key in sorted(set(wanted) | set(have))
        if have.get(key) != wanted.get(key)
    ]
    if diff:
        raise CacheMismatchError(
            f"cache {reader.url} group '{reader.group}' holds views of another recipe; its views cannot be "
            f"replayed as requested:\n  " + "\n  ".join(diff)
        )
    return cached


def check_cache_covers(reader: CacheReader, shards: Sequence[int], *, explicit: bool = True) -> None:
    """Refuse (`CacheError`) training over shards the group's dumps did not cover, saying which shards it covers
    and the two ways out (train on those with ``--shards``, or dump the rest)."""
    root, meta = reader.root_meta, reader.meta
    covered = meta.shard_indices(root.num_shards)
    missing = sorted(set(shards) - set(covered))
    if missing:
        asked = f"--shards {format_shards(shards)}" if explicit else f"all {root.num_shards} shards (no --shards)"
        raise CacheError(
            f"cache {reader.url} group '{reader.group}' covers shards {format_shards(covered)} of the data's "
            f"{root.num_shards}; training over {asked} needs shards {format_shards(missing)} too. Either train "
            f"on what it covers: --shards {format_shards(covered)}, or dump the rest: logitcache dump ... --out "
            f"{reader.url} --group {reader.group} --shards {format_shards(missing)} (the dump's own settings)")


def cache_identity(reader: CacheReader) -> dict[str, Any]:
    """What a training run depends on in a cache group: checked again on ``--resume`` (a group re-dumped with
    other weights, or grown from 10 to 20 epochs, which remaps ``epoch mod E``, is refused naming the change)."""
    meta, root = reader.meta, reader.root_meta
    return {"group": reader.group, "teacher": meta.teacher, "weights_digest": meta.weights_digest,
            "epochs": meta.epochs, "dataset_fingerprint": root.dataset_fingerprint, "k": meta.k,
            "temperatures": list(meta.temperatures), "recipe": meta.recipe, "value_dtype": meta.value_dtype,
            "seed": meta.seed}


_SHARD_FACTS = ("name", "num_samples", "keys_digest", "sha256", "size")


def _dataset_differences(reader: CacheReader, manifest: Manifest) -> list[str]:
    try:
        stored = reader.manifest_json()
    except CacheError as e:
        return [f"(the cache's manifest cannot be read to say which shards differ: {e})"]
    out = []
    theirs, ours = stored.get("shards", []), [s.to_json() for s in manifest.shards]
    for i in range(max(len(theirs), len(ours))):
        if i >= len(theirs):
            out.append(f"shard {i} ({ours[i]['name']}) is not in the cache's data")
            continue
        if i >= len(ours):
            out.append(f"shard {i} ({theirs[i]['name']}) of the cache's data is missing here")
            continue
        facts = [
            f"{k} {_short(theirs[i].get(k))} in the cache, {_short(ours[i].get(k))} here"
            for k in _SHARD_FACTS
            if theirs[i].get(k) != ours[i].get(k)
        ]
        if facts:
            out.append(f"shard {i} ({ours[i]['name']}) differs: " + "; ".join(facts))
    if list(stored.get("class_names", [])) != list(manifest.class_names):
        out.append("the class names differ")
    return out or ["(the shard facts agree; the manifests differ elsewhere, e.g. format version)"]


def _short(v: Any) -> str:
    s = str(v)
    return s[:16] + "…" if len(s) > 20 else s


# ------------------------------------------------------------------ rows of one unit
class RowSource:
    """Where a stage takes its soft-label rows: unit ``(unit_epoch, shard)`` of a cache group (PS-KD's store
    subclasses it to check that a slot holds the epoch it expects)."""

    def __init__(self, reader: CacheReader, unit_epoch: int):
        self.reader, self.unit_epoch = reader, unit_epoch

    def table(self, shard: int) -> UnitTable:
        return UnitTable(self.reader, self.unit_epoch, shard)


# ------------------------------------------------------------------ the stages
def by_sample(streams: Iterable[Iterable[ReplayItem]]) -> Iterator[list[ReplayItem]]:
    """The views that the units' mixers finished at one push, grouped by sample (a mixing recipe finishes a block
    of samples at once; the units of a pass finish the same block at the same push)."""
    groups: dict[int, list[ReplayItem]] = {}
    for stream in streams:
        for item in stream:
            groups.setdefault(item.index, []).append(item)
    yield from groups.values()


class _Views(torch.utils.data.IterableDataset):
    """Shared part: shard order and split (`ShardDataset`), decode, per-worker seeded shuffle buffer."""

    def __init__(
        self,
        data,
        *,
        epoch: int,
        recipe: Recipe,
        shards: Sequence[int] | None,
        rank: int | None,
        world_size: int | None,
        skip_bad: bool,
        shuffle_seed: int | None,
        shuffle_buffer: int,
        return_items: bool,
        views_per_decode: int = 1,
        batch_size: int | None = None,
        streams: int | None = None,
    ):
        super().__init__()
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if views_per_decode < 1:
            raise ValueError(f"views_per_decode must be >= 1, got {views_per_decode}")
        if views_per_decode > 1 and (batch_size is None or batch_size < 1):
            raise ValueError("views_per_decode > 1 needs the DataLoader's batch_size (the views of one image are "
                             "spread over different batches)")
        if streams is not None and (streams < 1 or batch_size is None or batch_size < 1):
            raise ValueError(f"streams={streams}: give streams >= 1 and the batch_size (each stream forms its own "
                             f"batches; use the dataset with DataLoader(batch_size=None) or `stream_batches`)")
        self.views_per_decode, self.batch_size, self.streams = views_per_decode, batch_size, streams
        self._check_pass_start(epoch)
        self.manifest = load_manifest(data)
        self.split = ShardDataset(self.manifest, shards, rank=rank, world_size=world_size,
                                  shuffle_seed=shuffle_seed, epoch=epoch)
        self.epoch, self.recipe, self.skip_bad = epoch, recipe, skip_bad
        self.shuffle_seed, self.shuffle_buffer, self.return_items = shuffle_seed, shuffle_buffer, return_items

    def set_epoch(self, epoch: int) -> None:
        """The epoch to yield (with views_per_decode N: the first epoch of the pass, a multiple of N)."""
        self._check_pass_start(epoch)
        self.epoch = epoch
        self.split.set_epoch(epoch)

    def _check_pass_start(self, epoch: int) -> None:
        if epoch % self.views_per_decode:
            raise ValueError(f"with views_per_decode={self.views_per_decode} a dataset yields a pass of "
                             f"{self.views_per_decode} epochs and starts at a multiple of it; got epoch {epoch}")

    @property
    def view_epochs(self) -> list[int]:
        """The training epochs whose views this pass yields (``[epoch]`` when views_per_decode is 1)."""
        return list(range(self.epoch, self.epoch + self.views_per_decode))

    @property
    def rank(self) -> int:
        return self.split.rank

    @property
    def world_size(self) -> int:
        return self.split.world_size

    def num_samples(self) -> int:
        """Samples (including any that will be skipped) in this rank's shards this epoch."""
        return self.split.num_samples()

    def _readers(self, num_workers: int) -> tuple[str, int]:
        """Who reads this rank's shards: the dataset's streams, or (``streams=None``) the DataLoader's workers."""
        return ("stream", self.streams) if self.streams is not None else ("worker", max(num_workers, 1))

    def reader_samples(self, num_workers: int = 0) -> list[int]:
        """Samples (including any that will be skipped) each reader of this rank reads this pass: each of its
        ``streams``, or (``streams=None``) each of ``num_workers`` DataLoader workers."""
        order, (_, n) = self.split.shard_order(), self._readers(num_workers)
        return [sum(self.manifest.shards[s].num_samples
                    for s in split_shards(order, self.rank, self.world_size, r, n)) for r in range(n)]

    def num_batches(self, batch_size: int | None = None, num_workers: int = 0) -> int:
        """Batches this rank yields this pass (views_per_decode views per sample) when nothing is skipped: each
        reader (stream, or DataLoader worker when ``streams=None``) batches its own samples and ends with its own
        partial batch. With streams, ``batch_size`` is the dataset's and ``num_workers`` does not matter."""
        batch_size = self.batch_size if self.streams is not None or batch_size is None else batch_size
        return sum(math.ceil(self.views_per_decode * n / batch_size) for n in self.reader_samples(num_workers))

    def check_spread(self, num_workers: int = 0) -> None:
        """Refuse (ValueError) a split where some reader of this rank (a stream; a DataLoader worker when
        ``streams=None``) holds fewer than batch_size samples: with views_per_decode > 1 their views could not all
        go to different batches."""
        if self.views_per_decode == 1:
            return
        what, _ = self._readers(num_workers)
        fewer = "--streams" if what == "stream" else "workers"
        for r, n in enumerate(self.reader_samples(num_workers)):
            if not spread_possible(n, self.batch_size):
                raise ValueError(
                    f"views_per_decode={self.views_per_decode}: rank {self.rank} {what} {r} reads {n} sample(s) in "
                    f"pass starting at epoch {self.epoch}, fewer than one batch ({self.batch_size}); the views of one "
                    f"image cannot all go to different batches. Use fewer {fewer} or ranks, a smaller batch, or "
                    f"views_per_decode 1")

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams is None:  # one stream per DataLoader worker, batched by the DataLoader
            for item in self._stream_items(self.split.assigned_shards(), worker):
                yield item if self.return_items else self._public(item)
            return
        check_workers(num_workers, self.streams)
        hosted = [self._stream_batches(s) for s in range(worker, self.streams, num_workers)]
        # with several workers, keep the slot of an exhausted stream (None) so the DataLoader's round robin over
        # the workers stays the round robin over the streams
        yield from round_robin(hosted, keep_slots=num_workers > 1)

    def _stream_batches(self, stream: int) -> Iterator[Any]:
        """Stream ``stream``'s collated batches: its full batches, then its partial last one."""
        shards = split_shards(self.split.shard_order(), self.rank, self.world_size, stream, self.streams)
        batch: list = []
        for item in self._stream_items(shards, stream):
            batch.append(item if self.return_items else self._public(item))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)

    def _stream_items(self, shards: list[int], stream: int) -> Iterator[ReplayItem]:
        """The items of one stream (a stream of `streams`, or a DataLoader worker) reading ``shards``: shuffled
        by a buffer seeded by (shuffle_seed, epoch, rank, stream), or with views_per_decode > 1 spread over the
        stream's batches."""
        if self.views_per_decode == 1:
            items: Iterator[ReplayItem] = (item for shard in shards for item in self._shard_items(shard))
            if self.shuffle_seed is not None and self.shuffle_buffer > 1:
                rng = random.Random(f"logitcache-order/{self.shuffle_seed}/{self.epoch}/{self.rank}/{stream}")
                items = shuffle_buffer(items, self.shuffle_buffer, rng)
            return items
        # each decoded image yields N views, spread over different batches of this stream
        n = sum(self.manifest.shards[s].num_samples for s in shards)
        plan = window_plan(n, self.views_per_decode, self.batch_size, self.shuffle_buffer)
        rng = None if self.shuffle_seed is None else random.Random(
            f"logitcache-spread/{self.shuffle_seed}/{self.epoch}/{self.views_per_decode}/{self.rank}/{stream}")
        groups = (group for shard in shards for group in self._shard_groups(shard))
        return spread_views(groups, plan, self.batch_size, rng,
                            where=f"rank {self.rank} {self._readers(0)[0]} {stream}")

    def _shard_items(self, shard: int) -> Iterator[ReplayItem]:
        """One item per sample: its view for ``self.epoch``."""
        for group in self._shard_groups(shard):
            yield from group

    def _shard_groups(self, shard: int) -> Iterator[list[ReplayItem]]:
        """Per sample (decoded once), its views for `view_epochs` (fewer where the cache has no row)."""
        raise NotImplementedError

    def _target(self, item: ReplayItem):
        """The public target: the label, or for mixing recipes the (C,) float32 mixed label (no smoothing)."""
        if not self.recipe.mixes:
            return item.target
        return mixed_targets(torch.tensor([item.target]), torch.tensor([item.partner_target]),
                             torch.tensor([item.lam]), self.manifest.num_classes)[0]

    def _public(self, item: ReplayItem) -> tuple:
        raise NotImplementedError


class CycledViewsWarning(UserWarning):
    """Training runs past the cached epochs: views repeat (epoch e replays cached epoch e mod E)."""


_CYCLE_WARNED: set[tuple[str, str]] = set()


class CachedViews(_Views):
    """``(image, TopKLogits row, target)`` for training epoch ``epoch``: each sample's view cached for epoch
    ``epoch mod E`` (E = the cache's epochs), replayed pixel for pixel, with the teacher's row for that view.

    ``data``: the dataset (manifest path/URL or `Manifest`) the cache was made from — checked, see
    `check_cache_matches`. ``cache``: a path/URL or a `CacheReader`; ``group``: its teacher group (optional
    when it holds one). ``recipe``: default the cache's; another one is refused. ``shards``: a subset of shard
    indices. ``rank``/``world_size``: default torchrun's. ``shuffle_seed``: None keeps shard order and sample
    order; an int shuffles shards per epoch and samples through a ``shuffle_buffer``-sample buffer.
    ``skip_bad``: leave out samples whose bytes do not decode. ``return_index``: yield
    ``(image, row, target, global_index)``. The reader opens lazily in each DataLoader worker.
    ``streams`` (with ``batch_size``): yield batches, read in that many streams, in an order that does not depend
    on the DataLoader's workers — iterate with `stream_batches` (see the module docstring).
    Mixing recipes (``deit``, ``tv-v2``): the image is the mixed view the teacher saw and ``target`` is the
    (C,) float32 mixed label ``λ·y + (1-λ)·y_partner`` (add label smoothing yourself). ``check_pixels``: before
    the first use of a cache in this process, replay the views whose pixel digest one unit's marker records and
    refuse (`ReplayMismatchError`, naming library versions) when they differ.
    """

    def __init__(
        self,
        data,
        cache,
        *,
        group: str | None = None,
        epoch: int,
        shards: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skip_bad: bool = False,
        shuffle_seed: int | None = None,
        recipe: Recipe | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        return_index: bool = False,
        return_items: bool = False,
        storage_options: dict[str, Any] | None = None,
        check_pixels: bool = True,
        views_per_decode: int = 1,
        batch_size: int | None = None,
        streams: int | None = None,
    ):
        self.reader = cache if isinstance(cache, CacheReader) else CacheReader(
            str(cache), group, storage_options=storage_options)
        manifest = load_manifest(data)
        recipe = check_cache_matches(self.reader, manifest, recipe)
        if check_pixels:
            check_replay(self.reader, manifest, recipe, once=True)
        self.cached_epochs = self.reader.meta.epochs
        self.return_index = return_index
        if views_per_decode > 1 and self.cached_epochs % views_per_decode:
            divisors = [d for d in range(1, self.cached_epochs + 1) if self.cached_epochs % d == 0]
            raise ValueError(f"views_per_decode={views_per_decode} does not divide the {self.cached_epochs} epoch(s) "
                             f"of views cache {self.reader.url} group '{self.reader.group}' holds (a pass would "
                             f"straddle the cycle); use one of {divisors}")
        super().__init__(manifest, epoch=epoch, recipe=recipe, shards=shards, rank=rank, world_size=world_size,
                         skip_bad=skip_bad, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                         return_items=return_items, views_per_decode=views_per_decode, batch_size=batch_size,
                         streams=streams)
        self._say_if_cycling()
        self.reader.epoch_markers(self.cached_epoch)  # read here, once: DataLoader workers get them with the reader

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._say_if_cycling()
        self.reader.epoch_markers(self.cached_epoch)

    @property
    def cached_epoch(self) -> int:
        return self.epoch % self.cached_epochs

    @property
    def cached_view_epochs(self) -> list[int]:
        """The cached epochs this pass replays, one per epoch of `view_epochs`."""
        return [e % self.cached_epochs for e in self.view_epochs]

    def _say_if_cycling(self) -> None:
        key = (self.reader.url, self.reader.group)
        if self.view_epochs[-1] >= self.cached_epochs and key not in _CYCLE_WARNED:
            _CYCLE_WARNED.add(key)
            warnings.warn(
                f"cache {self.reader.url} group '{self.reader.group}' holds {self.cached_epochs} epoch(s) of views; "
                f"training epoch {self.epoch} and later replay them cyclically (epoch e uses cached epoch "
                f"e mod {self.cached_epochs}). Dump more epochs for fresh views.",
                CycledViewsWarning,
                stacklevel=3,
            )

    def _shard_groups(self, shard: int) -> Iterator[list[ReplayItem]]:
        units = []
        for e in self.view_epochs:  # one unit (cached epoch e mod E, shard) per view epoch of the pass
            table = UnitTable(self.reader, e % self.cached_epochs, shard)
            # the stored params, mixed with the stored partner (UnitMixer: the dump's own code path)
            mixer = UnitMixer(self.recipe, seed=self.reader.meta.seed, epoch=e % self.cached_epochs, shard=shard,
                              stored=table.view_params)
            units.append((e, table, mixer))

        def items(e: int, table: UnitTable, views) -> Iterator[ReplayItem]:
            for v in views:
                s = v.sample
                yield ReplayItem(v.image, table.row(s.offset, s.label), s.label, s.index, v.params, v.partner_label,
                                 v.lam, e)

        for sample in iter_shard(self.manifest, shard, skip_bad=self.skip_bad):
            # skipped by the dump: no teacher row exists, and padding must never become a label
            live = [u for u in units if sample.offset not in u[1].skipped]
            source = view_source(sample.image, self.recipe, len(live))  # one conversion for N views
            yield from by_sample(items(e, table, mixer.push(sample, source)) for e, table, mixer in live)
        yield from by_sample(items(e, table, mixer.finish()) for e, table, mixer in units)

    def _public(self, item: ReplayItem) -> tuple:
        if self.return_index:
            return item.image, item.soft, self._target(item), item.index
        return item.image, item.soft, self._target(item)


class FreshViews(_Views):
    """``(image, target)`` for epoch ``epoch`` with views drawn as the dump draws them:
    ``sample_view(view_rng(seed, epoch, index))`` — online KD and teacher-free training see the distribution
    (with the dump's seed, the very views) a cache holds. ``recipe``: a `Recipe` or a recipe name.

    ``rows``: a `RowSource` whose rows to attach (PS-KD's previous predictions); items then carry them in
    `ReplayItem.soft`. ``return_index``: yield ``(image, target, global_index)``.
    """

    def __init__(
        self,
        data,
        *,
        seed: int,
        epoch: int,
        recipe: Recipe | str,
        image_size: int | None = None,
        shards: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skip_bad: bool = False,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        rows: RowSource | None = None,
        return_index: bool = False,
        return_items: bool = False,
        views_per_decode: int = 1,
        batch_size: int | None = None,
        streams: int | None = None,
    ):
        if isinstance(recipe, str):
            recipe = get_recipe(recipe, image_size)
        if rows is not None and views_per_decode > 1:
            raise ValueError("rows (PS-KD's previous-epoch predictions) need views_per_decode 1: the previous epoch "
                             "is inside the same pass")
        self.seed, self.rows, self.return_index = seed, rows, return_index
        super().__init__(data, epoch=epoch, recipe=recipe, shards=shards, rank=rank, world_size=world_size,
                         skip_bad=skip_bad, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                         return_items=return_items, views_per_decode=views_per_decode, batch_size=batch_size,
                         streams=streams)

    def _shard_groups(self, shard: int) -> Iterator[list[ReplayItem]]:
        table = self.rows.table(shard) if self.rows is not None else None
        # one mixer per view epoch of the pass: draws, as the dump does
        length = self.manifest.shards[shard].num_samples
        mixers = [(e, UnitMixer(self.recipe, seed=self.seed, epoch=e, shard=shard, length=length))
                  for e in self.view_epochs]

        def items(e: int, views) -> Iterator[ReplayItem]:
            for v in views:
                s = v.sample
                soft = table.row(s.offset, s.label) if table is not None else None
                yield ReplayItem(v.image, soft, s.label, s.index, v.params, v.partner_label, v.lam, e)

        for sample in iter_shard(self.manifest, shard, skip_bad=self.skip_bad):
            source = view_source(sample.image, self.recipe, len(mixers))  # one conversion for N views
            yield from by_sample(items(e, mixer.push(sample, source)) for e, mixer in mixers)
        yield from by_sample(items(e, mixer.finish()) for e, mixer in mixers)

    def _public(self, item: ReplayItem) -> tuple:
        head = (item.image,) if item.soft is None else (item.image, item.soft)
        target = self._target(item)
        return (*head, target, item.index) if self.return_index else (*head, target)


# ------------------------------------------------------------------ a webdataset stage for your own pipeline
class CachedViewsStage:
    """A webdataset pipeline stage that attaches cached views to raw samples: for each sample of ``data``'s shards
    (``{"__key__", "__url__", ext: bytes}``, as ``webdataset.tarfile_to_samples()`` or our `tarfile_samples`
    yield them), it adds ``image`` (uint8 (3, S, S): the view cached for epoch ``epoch mod E``, replayed pixel
    for pixel), ``soft`` (that view's `TopKLogits` row), ``target``, ``index`` (the global sample index) and
    ``epoch`` (the training epoch whose view it is).

    Checked as `CachedViews` checks: the cache must have been made from ``data`` (dataset fingerprint) with the
    recipe replayed; each shard's samples must come in order, complete, with the manifest's keys (count and key
    digest, checked when the shard ends). Put it right after the tar reader, before any shuffle or filter (it
    counts each shard's samples to know their offsets); shards may come in any order and be split over nodes and
    workers (``split_by_node``, ``split_by_worker``). Samples the dump skipped have no row and are dropped;
    samples whose bytes do not decode raise `BadSampleError` (``skip_bad=True``: dropped). ``set_epoch(e)``
    moves to another epoch; the cache opens lazily in each DataLoader worker. Mixing recipes (``deit``,
    ``tv-v2``): each view is mixed with its stored partner of the same shard (so samples leave the stage a block of
    16 late) and ``target`` is the (C,) float mixed label.

    ``views_per_decode=N`` (as `CachedViews`): ``epoch`` (a multiple of N) starts a pass; each raw sample is
    decoded once and leaves as N samples, its views for epochs ``epoch .. epoch+N-1`` (cached epochs
    ``(epoch+j) mod E``; N must divide E). They are spread over this stream's batches of ``batch_size`` (required)
    so that no batch holds two views of one image — batch right after the stage (``to_tuple``/``map`` in between
    are fine; a shuffle or filter in between undoes the spread). ``shuffle_seed`` (None: in order) shuffles the
    images and batches within each spread window.
    """

    def __init__(self, data, cache, *, epoch: int, group: str | None = None, recipe: Recipe | None = None,
                 skip_bad: bool = False, storage_options: dict[str, Any] | None = None, views_per_decode: int = 1,
                 batch_size: int | None = None, shuffle_seed: int | None = None):
        self.reader = cache if isinstance(cache, CacheReader) else CacheReader(
            str(cache), group, storage_options=storage_options)
        self.manifest = load_manifest(data)
        self.recipe = check_cache_matches(self.reader, self.manifest, recipe)
        check_replay(self.reader, self.manifest, self.recipe, once=True)
        self.cached_epochs, self.skip_bad = self.reader.meta.epochs, skip_bad
        if views_per_decode < 1:
            raise ValueError(f"views_per_decode must be >= 1, got {views_per_decode}")
        if views_per_decode > 1 and (batch_size is None or batch_size < 1):
            raise ValueError("views_per_decode > 1 needs the batch_size of the batching that follows the stage (the "
                             "views of one image are spread over different batches)")
        if self.cached_epochs % views_per_decode:
            divisors = [d for d in range(1, self.cached_epochs + 1) if self.cached_epochs % d == 0]
            raise ValueError(f"views_per_decode={views_per_decode} does not divide the {self.cached_epochs} epoch(s) "
                             f"of views cache {self.reader.url} group '{self.reader.group}' holds (a pass would "
                             f"straddle the cycle); use one of {divisors}")
        self.views_per_decode, self.batch_size, self.shuffle_seed = views_per_decode, batch_size, shuffle_seed
        self.epoch = 0
        self.set_epoch(epoch)
        self._by_url: dict[str, int] = {}
        names: dict[str, list[int]] = {}
        for i, info in enumerate(self.manifest.shards):
            self._by_url[self.manifest.shard_url(i)] = i
            self._by_url[info.name] = i
            names.setdefault(info.name.rsplit("/", 1)[-1], []).append(i)
        for base, shards in names.items():  # a copy elsewhere is recognised by its file name, when unique
            if len(shards) == 1:
                self._by_url.setdefault(base, shards[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch to attach (with views_per_decode N: the first epoch of the pass, a multiple of N)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch % self.views_per_decode:
            raise ValueError(f"with views_per_decode={self.views_per_decode} a pass starts at a multiple of it; got "
                             f"epoch {epoch}")
        self.epoch = epoch
        last = epoch + self.views_per_decode - 1
        if last >= self.cached_epochs:
            warnings.warn(f"cache {self.reader.url} holds {self.cached_epochs} epoch(s) of views; epoch {last} "
                          f"replays cached epoch {last % self.cached_epochs}", CycledViewsWarning, stacklevel=2)

    @property
    def view_epochs(self) -> list[int]:
        """The training epochs whose views a pass attaches (``[epoch]`` when views_per_decode is 1)."""
        return list(range(self.epoch, self.epoch + self.views_per_decode))

    def shard_of(self, url: str) -> int:
        """The manifest's shard index of a sample's ``__url__`` (full URL, manifest name, or a unique file name)."""
        for candidate in (url, url.rsplit("/", 1)[-1]):
            if candidate in self._by_url:
                return self._by_url[candidate]
        raise DataError(f"{url}: not a shard of the dataset {self.manifest.base_url or ''} (its manifest names "
                        f"{len(self.manifest.shards)} shards, e.g. {self.manifest.shards[0].name})")

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        groups = self._groups(src)
        if self.views_per_decode == 1:
            for group in groups:
                yield from group
            return
        rng = None if self.shuffle_seed is None else random.Random(
            f"logitcache-stage-spread/{self.shuffle_seed}/{self.epoch}/{self.views_per_decode}")
        yield from spread_stream(groups, self.views_per_decode, self.batch_size, rng, where="cached_views_stage")

    def _units(self, shard: int) -> list[tuple[int, UnitTable, UnitMixer]]:
        units = []
        for e in self.view_epochs:  # one unit (cached epoch e mod E, shard) per view epoch of the pass
            table = UnitTable(self.reader, e % self.cached_epochs, shard)
            # the dump's own path: stored params, mixing recipes mix with the stored partner of the unit
            units.append((e, table, UnitMixer(self.recipe, seed=self.reader.meta.seed, epoch=e % self.cached_epochs,
                                              shard=shard, stored=table.view_params)))
        return units

    def _groups(self, src: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Per decoded sample, its finished views (one dict each; the raw dict itself when N is 1)."""
        url, shard, check, offset, units = None, -1, None, 0, []
        for sample in src:
            if sample.get("__url__") != url:
                yield from self._by_sample([(e, t, m.finish()) for e, t, m in units])
                if check is not None:
                    check.finish()
                url = sample.get("__url__")
                if url is None:
                    raise DataError(f"sample {sample.get('__key__')!r} has no __url__: put this stage right after "
                                    "the tar reader (tarfile_to_samples)")
                shard = self.shard_of(url)
                check = ShardCheck(self.manifest.shards[shard], url)
                units, offset = self._units(shard), -1
            offset += 1
            check.add_key(sample["__key__"])
            live = [u for u in units if offset not in u[1].skipped]
            if not live:
                continue  # the dump skipped it: no teacher row
            try:
                image, label = decode_sample(sample, self.manifest.num_classes, label_key=self.manifest.label_key)
            except BadSampleError:
                if self.skip_bad:
                    continue
                raise
            s = _StageSample(offset, self.manifest.shards[shard].first_index + offset, image, label, url, sample)
            source = view_source(image, self.recipe, len(live))  # one conversion for N views
            yield from self._by_sample([(e, t, m.push(s, source)) for e, t, m in live])
        yield from self._by_sample([(e, t, m.finish()) for e, t, m in units])
        if check is not None:
            check.finish()

    def _by_sample(self, pushed: list[tuple[int, UnitTable, list]]) -> Iterator[list[dict[str, Any]]]:
        groups: dict[int, list[dict[str, Any]]] = {}
        for e, table, views in pushed:
            for v in views:
                s = v.sample
                d = s.raw if self.views_per_decode == 1 else dict(s.raw)
                d["image"], d["soft"], d["index"], d["epoch"] = v.image, table.row(s.offset, s.label), s.index, e
                d["target"] = s.label if not self.recipe.mixes else mixed_targets(
                    torch.tensor([s.label]), torch.tensor([v.partner_label]), torch.tensor([v.lam]),
                    self.manifest.num_classes)[0]
                groups.setdefault(s.offset, []).append(d)
        yield from groups.values()


class _StageSample(NamedTuple):
    """A webdataset sample as `UnitMixer` takes it (offset, index, image, label, where) plus the dict itself."""

    offset: int
    index: int
    image: torch.Tensor
    label: int
    url: str
    raw: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.url}:{self.raw.get('__key__')}"


def cached_views_stage(data, cache, *, epoch: int, group: str | None = None, **kwargs) -> CachedViewsStage:
    """The webdataset stage of `CachedViewsStage` (a callable ``stage(samples) -> samples``; ``views_per_decode``,
    ``batch_size``, ``shuffle_seed``: several views per decode); see there."""
    return CachedViewsStage(data, cache, epoch=epoch, group=group, **kwargs)


__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "CachedViews",
    "CachedViewsStage",
    "CycledViewsWarning",
    "FreshViews",
    "ReplayItem",
    "RowSource",
    "UnitTable",
    "DEFAULT_STREAMS",
    "cached_views_stage",
    "check_cache_matches",
    "check_workers",
    "collate",
    "stream_batches",
]
