"""Stage 1: run a teacher once over replayable augmented views and write its top-k logits into a cache.

    shards ─► split by rank (shard % world) ─► DataLoader workers (shards split again) ─► decode
      ─► for each pending epoch e: params = sample_view(view_rng(seed, e, index)); x = apply_view(image, params)
      ─► batches that never span two (epoch, shard) units, composed as a pure function of the unit
      ─► teacher (eval, inference_mode; AMP + channels_last on GPU, logits reduced in fp32)
      ─► TopKLogits.from_logits (NaN/Inf is an error naming the sample) ─► CacheWriter.write_unit (marker last)

Resumable: finished units (with a marker) are skipped, unfinished ones redone; the bytes of a unit depend only
on the unit, so an interrupted-and-resumed dump equals an uninterrupted one, whatever the rank/worker counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from logitcache.cache import schema
from logitcache.cache.packs import finish_units
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ZARR_JSON, ObjectStore, load_group_meta, unfinish_units
from logitcache.cache.verify import verify_cache
from logitcache.cache.writer import CacheWriter
from logitcache.data.manifest import ShardCheck, file_size, load_manifest
from logitcache.data.shards import iter_shard
from logitcache.errors import CacheMetadataError, LogitcacheError
from logitcache.labels.codecs import DEFAULT_CODEC, PackedCodec, codec_settings
from logitcache.labels.tails import UNIFORM, PriorAccumulator, SampledTail, TailRule, parse_tail, tail_settings
from logitcache.labels.topk import TopKLogits, _normalise_temperatures
from logitcache.runtime.dist import PREFETCH_BATCHES, DistEnv, init_distributed
from logitcache.runtime.precision import check_teacher_precision
from logitcache.runtime.provenance import provenance, utc_now
from logitcache.teacher import Teacher
from logitcache.views.digest import DigestBuilder
from logitcache.views.mixing import UnitMixer
from logitcache.views.recipe import Recipe, resolve_recipe

#: tests only: SIGKILL the dump right before its N+1-th batch (a real kill, mid-run, at a reproducible point)
KILL_AFTER_BATCHES_ENV = "LOGITCACHE_TEST_KILL_AFTER_BATCHES"


@dataclass(frozen=True)
class DumpConfig:
    data: str
    out: str
    teacher: str
    weights: str | None = None
    group: str | None = None
    epochs: int = 1
    topk: int = 10
    temperatures: tuple[float, ...] = (1.0,)
    seed: int = 0
    recipe: str | None = None  # None: the existing group's, else the data's default_recipe (`dump_recipe`)
    image_size: int | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    value_dtype: str = "float16"  # format 1 only
    shards: tuple[int, ...] | None = None
    skip_bad: bool = False
    repair: bool = False
    progress: bool = True
    teacher_precision: str | None = None  # None: bf16 on a GPU, fp32 elsewhere (`runtime.precision`)
    #: how the mass outside the top-k is reconstructed: uniform | prior | sampled[:M] (format 2)
    tail: str = "uniform"
    #: format 2's value coding, `labels.codecs.codec_name` (packed-q<B>[-knee<N>][-r<R>])
    codec: str = DEFAULT_CODEC
    #: cache format for a new cache (an existing cache keeps its own): 2 (default) or 1
    format: int = 2
    #: tail 'prior': calibration views (epoch 0, first shards); None: 20 per class
    prior_views: int | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {self.topk}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.value_dtype not in schema.VALUE_DTYPES:
            raise ValueError(f"--value-dtype must be one of {schema.VALUE_DTYPES}")
        parse_tail(self.tail)  # ValueError naming the choices
        if self.format not in (1, 2):
            raise ValueError(f"--format must be 1 or 2, got {self.format}")
        if self.format == 1 and self.tail != "uniform":
            raise ValueError("format 1 has only the uniform tail: use format 2 for --tail " + self.tail)
        codec_settings(self.codec)  # ValueError saying the grammar
        if self.format == 1 and self.codec != DEFAULT_CODEC:
            raise ValueError(f"--codec {self.codec} is format 2's value coding; format 1 stores --value-dtype arrays")
        if self.teacher_precision is not None:
            check_teacher_precision(self.teacher_precision)

    @property
    def group_name(self) -> str:
        return self.group or self.teacher.replace("/", "_").replace(":", "_")


# ------------------------------------------------------------------ the view stage (runs in loader workers)
@dataclass
class ViewBatch:
    epoch: int
    shard: int
    offsets: torch.Tensor  # (B,) positions in the shard
    images: torch.Tensor  # (B, 3, S, S) uint8: the exact pixels the teacher sees (before normalisation)
    labels: torch.Tensor  # (B,)
    view_params: torch.Tensor  # (B, P) int16
    sample_ids: list[str]  # url:key, for error messages
    end_of_unit: bool = False
    unit_length: int = 0
    skipped: tuple[int, ...] = ()
    replay: dict | None = None  # the end-of-unit batch carries the unit's replay digest (views/digest.py)


class UnitViews(torch.utils.data.IterableDataset):
    """Yields `ViewBatch`es for the pending (epoch, shard) units; each shard is decoded once for all its epochs.

    Shards are split over DataLoader workers; a unit's batches come from one worker, in order.
    """

    def __init__(self, manifest, pending: dict[int, list[int]], recipe, seed: int, batch_size: int, skip_bad: bool):
        self.manifest, self.pending, self.recipe = manifest, pending, recipe
        self.seed, self.batch_size, self.skip_bad = seed, batch_size, skip_bad

    def __iter__(self) -> Iterator[ViewBatch]:
        info = torch.utils.data.get_worker_info()
        shards = sorted(self.pending)
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        for s in shards:
            yield from self._shard_batches(s, self.pending[s])

    def _shard_batches(self, shard: int, epochs: list[int]) -> Iterator[ViewBatch]:
        """Decode ``batch_size`` samples at a time and feed that chunk to each pending epoch's unit in turn: a worker
        holds one chunk of decoded images and one batch of views whatever the number of epochs (mixing recipes
        also hold each epoch's current block of ``mix_block`` views). Each epoch's views come in offset order
        through its own `UnitMixer`, so batch j of a unit is the same whatever the chunking (the batches, hence
        the cache's bytes, are those of decoding the shard once per epoch)."""
        buffers: dict[int, list] = {e: [] for e in epochs}
        # the views of each unit, in offset order (mixing recipes finish a block of them at a time, each view
        # mixed with a partner of the same unit), and the digest of the unit's first views for its marker
        length = self.manifest.shards[shard].num_samples
        mixers = {e: UnitMixer(self.recipe, seed=self.seed, epoch=e, shard=shard, length=length) for e in epochs}
        digests = {e: DigestBuilder() for e in epochs}
        seen: set[int] = set()

        def add(e: int, views) -> Iterator[ViewBatch]:
            for v in views:
                digests[e].add(v.sample.offset, v.image)
                buffers[e].append((v.sample.offset, v.image, v.sample.label, v.params, v.sample.where))
                if len(buffers[e]) == self.batch_size:
                    yield _collate(e, shard, buffers[e])
                    buffers[e] = []

        def views(e: int, chunk: list) -> Iterator[ViewBatch]:
            for sample in chunk:
                yield from add(e, mixers[e].push(sample))

        chunk: list = []
        for sample in iter_shard(self.manifest, shard, skip_bad=self.skip_bad):
            seen.add(sample.offset)
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                for e in epochs:
                    yield from views(e, chunk)
                chunk = []
        skipped = tuple(sorted(set(range(length)) - seen))
        for e in epochs:  # the unit's last batch (possibly empty) carries its length and what was skipped
            yield from views(e, chunk)
            yield from add(e, mixers[e].finish())
            yield dataclasses.replace(
                _collate(e, shard, buffers[e], self.recipe), end_of_unit=True, unit_length=length, skipped=skipped,
                replay=digests[e].record(),
            )


def _collate(epoch: int, shard: int, items: list, recipe=None) -> ViewBatch:
    if not items:
        p = len(recipe.param_fields)
        s = recipe.image_size
        return ViewBatch(
            epoch,
            shard,
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 3, s, s, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, p, dtype=torch.int16),
            [],
        )
    offsets, xs, labels, params, ids = zip(*items, strict=True)
    return ViewBatch(
        epoch,
        shard,
        torch.tensor(offsets),
        torch.stack(xs),
        torch.tensor(labels),
        torch.from_numpy(np.stack(params).astype(np.int16)),
        list(ids),
    )


# ------------------------------------------------------------------ the plan and the loop
@dataclass
class DumpSummary:
    cache: str
    group: str
    units_written: int
    units_skipped_done: int
    views_written: int
    bytes_on_disk: int
    bytes_per_view: float
    teacher_top1: float
    mean_topk_mass: float
    samples_skipped: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(cfg: DumpConfig) -> dict[str, Any]:
    """What a dump would do (for ``--dry-run``): units, views, and bytes estimated from the schema's figures."""
    manifest = load_manifest(cfg.data)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    views_per_epoch = sum(manifest.shards[s].num_samples for s in shards)

    recipe = dump_recipe(cfg, manifest)
    fmt, coding = cache_format(cfg), f"arrays-{cfg.value_dtype}"
    if fmt == 2:
        codec = packed_codec(cfg, manifest, recipe, _temps(cfg))
        raw, coding = codec.n_fields * np.dtype(codec.dtype).itemsize, codec.name
    else:
        raw = schema.raw_bytes_per_view(
            cfg.topk, len(_temps(cfg)), len(recipe.param_fields), manifest.num_classes, cfg.value_dtype
        )
    return {
        "cache": cfg.out,
        "group": cfg.group_name,
        "units": len(shards) * cfg.epochs,
        "shards": len(shards),
        "epochs": cfg.epochs,
        "views": views_per_epoch * cfg.epochs,
        "recipe": f"{recipe.name}@{recipe.version}",
        "format": fmt,
        "codec": coding,
        "tail": cfg.tail,
        "raw_bytes_per_view": raw,
        "uncompressed_bytes_upper_bound": int(views_per_epoch * cfg.epochs * raw),
    }


def _temps(cfg: DumpConfig) -> tuple[float, ...]:
    return _normalise_temperatures(cfg.temperatures)


def dump(cfg: DumpConfig, *, argv: list[str] | None = None) -> DumpSummary:
    """Run stage 1 as ``cfg`` says (resuming any unfinished units); every rank of a torchrun job calls this."""
    t0 = time.perf_counter()
    manifest, temps = load_manifest(cfg.data), _temps(cfg)
    recipe = dump_recipe(cfg, manifest)
    env = init_distributed(cfg.device, backend="gloo")  # the ranks only meet at barriers; cuda -> cuda:LOCAL_RANK
    teacher = Teacher.load(cfg.teacher, cfg.weights, manifest.num_classes, recipe.image_size, env.device, cfg.seed,
                           precision=cfg.teacher_precision)
    writer = open_writer(cfg, env, manifest, group_meta(cfg, manifest, recipe, teacher, temps))
    writer = calibrate_prior(cfg, env, manifest, recipe, teacher, writer, temps)
    prov = provenance(argv)
    run_key = writer.start_run(writer_shards(cfg), cfg.epochs, prov) if env.is_main else None
    if cfg.repair and env.is_main:
        repaired = forget_damaged_units(cfg.out, cfg.group_name)
        if repaired and cfg.progress:
            print(f"repair: redoing {len(repaired)} damaged unit(s): {repaired}", file=sys.stderr)
    env.barrier()
    finished = writer.finished_units()
    pending = pending_units(finished, selected_shards(cfg, manifest)[env.rank :: env.world], cfg.epochs)
    loader = torch.utils.data.DataLoader(
        UnitViews(manifest, pending, recipe, cfg.seed, cfg.batch_size, cfg.skip_bad), batch_size=None,
        num_workers=cfg.workers, collate_fn=lambda b: b, pin_memory=env.device.startswith("cuda"),
        persistent_workers=False, prefetch_factor=PREFETCH_BATCHES if cfg.workers else None,
    )
    n_views = sum(manifest.shards[s].num_samples * len(es) for s, es in pending.items())
    bar = tqdm(total=n_views, unit="view", desc=f"dump {cfg.group_name}", disable=not cfg.progress or not env.is_main,
               dynamic_ncols=True)
    units = UnitAccumulator(writer, pending, manifest)
    kill_after = int(os.environ.get(KILL_AFTER_BATCHES_ENV, "0"))  # fault injection for the resume tests
    with torch.inference_mode():
        for n_batch, batch in enumerate(loader, start=1):
            if kill_after and n_batch > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if len(batch.offsets):
                logits = teacher.logits(batch.images)
                units.add(batch, soft_labels(writer.meta, cfg, batch, logits, temps).to("cpu"))
            bar.update(len(batch.offsets))
            if batch.end_of_unit:
                units.finish(batch)
                bar.set_postfix(units=f"{units.written}/{sum(len(es) for es in pending.values())}")
    bar.close()
    env.barrier()
    if env.is_main:
        # readers then read one object per epoch, not its markers; format 2 seals the units into packs
        finish_indexes(writer)
        writer.finish_run(run_key, end_time=utc_now(), units_written=units.written,
                          samples_skipped=units.samples_skipped)
    env.barrier()
    return summarize(CacheReader(cfg.out, cfg.group_name), units.written, len(finished), units.samples_skipped,
                     time.perf_counter() - t0)


def finish_indexes(writer: CacheWriter) -> None:
    """The end of a dump (`cache.packs.finish_units`), saying which epochs could not be sealed now and why."""
    for epoch, why in finish_units(writer.objects, writer.group, writer.meta).left.items():
        print(f"dump: epoch {epoch}'s units were left unsealed ({why}); `logitcache verify {writer.url}` names "
              "any damage and `dump ... --repair` redoes it", file=sys.stderr)


def writer_shards(cfg: DumpConfig) -> tuple[int, ...] | None:
    return None if cfg.shards is None else tuple(sorted(cfg.shards))


def dump_recipe(cfg: DumpConfig, manifest) -> Recipe:
    """THE recipe rule (`resolve_recipe`) for a dump: the group's own recipe when it exists (flags given must agree
    with it), else ``--recipe``, else the data's ``default_recipe``, else a clear error."""
    cached = None
    if _safe_group(cfg.group_name):
        objects = ObjectStore(cfg.out)
        try:
            if objects.get(f"{cfg.group_name}/zarr.json", **ZARR_JSON) is not None:
                cached = load_group_meta(objects, cfg.group_name).recipe
        except CacheMetadataError:
            pass  # the writer refuses invalid metadata itself (and says so for --repair)
    return resolve_recipe(cfg.recipe, cfg.image_size, cached=cached,
                          cached_where=f"cache {cfg.out} group '{cfg.group_name}'",
                          default=manifest.default_recipe, default_where=f"the manifest of {cfg.data}")


def _safe_group(name: str) -> bool:
    try:
        schema.validate_group_name(name)
    except ValueError:
        return False  # the writer refuses it with its own message
    return True


def selected_shards(cfg: DumpConfig, manifest) -> list[int]:
    return list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))


def cache_format(cfg: DumpConfig) -> int:
    """The format this dump writes: an existing cache's own (so it stays readable as it was), else cfg.format."""
    existing = CacheWriter.existing_format(cfg.out)
    return existing[0] if existing is not None else cfg.format


def packed_codec(cfg: DumpConfig, manifest, recipe, temps: tuple[float, ...]) -> PackedCodec:
    """Format 2's codec for this dump: --codec's value coding, with the sampled tail's M."""
    return PackedCodec(cfg.topk, manifest.num_classes, len(temps), len(recipe.param_fields),
                       tail_samples=parse_tail(cfg.tail)[1], **codec_settings(cfg.codec))


def group_meta(cfg: DumpConfig, manifest, recipe, teacher: Teacher, temps: tuple[float, ...]) -> schema.GroupMeta:
    """What the group records about this dump: everything that determines its bytes (`GroupMeta.settings`)."""
    packed = cache_format(cfg) == 2
    if not packed and cfg.tail != "uniform":
        raise LogitcacheError(f"{cfg.out} is a format 1 cache: it has only the uniform tail (--tail {cfg.tail})")
    if not packed and cfg.codec != DEFAULT_CODEC:
        raise LogitcacheError(f"{cfg.out} is a format 1 cache: --codec {cfg.codec} is format 2's value coding")
    codec = packed_codec(cfg, manifest, recipe, temps)
    return schema.GroupMeta(
        teacher=cfg.teacher, weights=cfg.weights, weights_digest=teacher.digest, num_classes=manifest.num_classes,
        normalization=teacher.normalization, recipe=recipe.to_json(), param_fields=tuple(recipe.param_fields),
        k=cfg.topk, temperatures=temps, seed=cfg.seed, epochs=cfg.epochs,
        shards=None if cfg.shards is None else tuple(sorted(cfg.shards)),
        value_dtype=None if packed else cfg.value_dtype,
        index_dtype=None if packed else schema.index_dtype(manifest.num_classes),
        codec=codec.to_json() if packed else None,
        tail=tail_settings(cfg.tail, prior_views=prior_views(cfg, manifest)) if packed else None,
        teacher_precision=teacher.precision,
    )


def prior_views(cfg: DumpConfig, manifest) -> int:
    return cfg.prior_views if cfg.prior_views is not None else 20 * manifest.num_classes


def tail_rule(meta: schema.GroupMeta) -> TailRule:
    """The rule the dump needs per row: only ``sampled`` draws anything while dumping."""
    return SampledTail(int(meta.tail["m"])) if meta.tail_name == "sampled" else UNIFORM


def soft_labels(meta: schema.GroupMeta, cfg: DumpConfig, batch: ViewBatch, logits, temps) -> TopKLogits:
    """A batch's rows as the group's format stores them; the sampled tail's draws are a pure function of
    (seed, epoch, shard, the batch's first offset), so the cache bytes do not depend on ranks or workers."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(
        f"tail|{cfg.seed}|{batch.epoch}|{batch.shard}|{int(batch.offsets[0])}".encode()).digest()[:8], "little"))
    return TopKLogits.from_logits(logits.cpu(), batch.labels, cfg.topk, temps, sample_ids=batch.sample_ids,
                                  keep_rest=meta.packed, tail=tail_rule(meta) if meta.packed else UNIFORM,
                                  generator=g)


def calibrate_prior(cfg: DumpConfig, env: DistEnv, manifest, recipe, teacher: Teacher, writer: CacheWriter,
                    temps) -> CacheWriter:
    """Tail ``prior``: before any unit, the main rank runs the teacher over the epoch-0 views of the first shards
    (in shard order) until ``prior_views`` views are covered and records the class prior (once per group)."""
    if writer.meta.tail_name != "prior" or writer.meta.tail_prior_digest:
        return writer
    if env.is_main:
        shards = shards_covering(manifest, selected_shards(cfg, manifest), prior_views(cfg, manifest))
        acc = PriorAccumulator(manifest.num_classes)
        views = UnitViews(manifest, {s: [0] for s in shards}, recipe, cfg.seed, cfg.batch_size, cfg.skip_bad)
        loader = torch.utils.data.DataLoader(views, batch_size=None, num_workers=cfg.workers,
                                             collate_fn=lambda b: b)
        with torch.inference_mode():
            for batch in loader:
                if len(batch.offsets):
                    logits = teacher.logits(batch.images).cpu()
                    acc.add(logits, TopKLogits.from_logits(logits, batch.labels, cfg.topk, temps).indices,
                            batch.labels)
        writer.put_prior(acc.prior())
    env.barrier()
    return CacheWriter.open(cfg.out, cfg.group_name)


def shards_covering(manifest, shards: list[int], n: int) -> list[int]:
    """The first of ``shards`` (in order) that hold at least ``n`` samples together (all when they hold fewer):
    where the prior calibration and `logitcache probe` take their epoch-0 views."""
    out, have = [], 0
    for s in shards:
        if have >= n:
            break
        out.append(s)
        have += manifest.shards[s].num_samples
    return out


def open_writer(cfg: DumpConfig, env: DistEnv, manifest, meta: schema.GroupMeta) -> CacheWriter:
    """Rank 0 creates (or checks and extends) the cache and group, then the other ranks open it."""
    writer = None
    if env.is_main:
        # cheap facts first (one size query per shard), so a changed shard stops the dump before the cache is
        # created or its epochs grown; key digests are checked as each shard is read, sha256 by verify --data
        check_shard_sizes(manifest, selected_shards(cfg, manifest))
        root = schema.RootMeta(manifest.fingerprint, manifest.num_classes, len(manifest.shards),
                                tuple(s.num_samples for s in manifest.shards),
                               format_version=(2, 0) if meta.packed else schema.FORMAT_1)
        try:
            writer = CacheWriter.create_or_open(cfg.out, cfg.group_name, meta, root, manifest.to_json())
        except CacheMetadataError as e:
            if cfg.repair:
                raise CacheMetadataError(f"refusing to --repair: the cache's metadata is invalid, which is not "
                                         f"damage a rerun can redo; nothing was changed. {e}") from None
            raise
    env.barrier()
    return writer if writer is not None else CacheWriter.open(cfg.out, cfg.group_name)


def pending_units(finished, shards: list[int], epochs: int) -> dict[int, list[int]]:
    """shard -> the epochs of its units that have no marker yet (this rank's shards only)."""
    pending: dict[int, list[int]] = {}
    for s in shards:
        todo = [e for e in range(epochs) if (e, s) not in finished]
        if todo:
            pending[s] = todo
    return pending


class UnitAccumulator:
    """Collects each pending unit's rows batch by batch and writes the unit (marker last) when its last batch
    arrives. A shard's units grow together (its batches come epoch after epoch for each chunk of samples), so
    their rows live in arrays allocated once, when the shard's first batch arrives (`ShardRows`)."""

    def __init__(self, writer: CacheWriter, pending: dict[int, list[int]], manifest):
        self.writer, self.pending, self.manifest = writer, pending, manifest
        self.shards: dict[int, ShardRows] = {}
        self.written = 0
        self.skipped_by_shard: dict[int, int] = {}

    def add(self, batch: ViewBatch, topk: TopKLogits) -> None:
        rows = self.shards.get(batch.shard)
        if rows is None:
            rows = self.shards[batch.shard] = ShardRows(
                self.pending[batch.shard], self.manifest.shards[batch.shard].num_samples, topk,
                batch.view_params.shape[1])
        rows.add(batch.epoch, batch.offsets, batch.view_params, topk)

    def finish(self, batch: ViewBatch) -> None:
        rows = self.shards.get(batch.shard)
        parts = [] if rows is None else rows.take(batch.epoch)
        if rows is not None and rows.done():
            del self.shards[batch.shard]
        _write_unit(self.writer, batch, parts)
        self.written += 1
        self.skipped_by_shard[batch.shard] = len(batch.skipped)

    @property
    def samples_skipped(self) -> int:
        return sum(self.skipped_by_shard.values())


class ShardRows:
    """The teacher rows of one shard's pending units until each unit ends, in arrays allocated once (each of the
    rows' tensors, in the dtype the teacher stage produced). Keeping every batch's row tensors instead scatters
    small long-lived objects among the freed view batches, and the heap then grows with ``--epochs`` (measured:
    +35% peak RSS at 100 epochs; see pipelines/bench_dump.py --rss). What stays is ``epochs × shard length``
    rows, about 150 bytes each at k = 10."""

    FIELDS = ("indices", "logits", "target", "target_logprob", "lse", "log_rest", "tail_indices", "tail_logprobs")

    def __init__(self, epochs: list[int], length: int, like: TopKLogits, n_params: int):
        self.slot = {e: i for i, e in enumerate(epochs)}
        self.open = set(epochs)
        self.like = like  # temperatures, classes and tail rule, shared by the unit's rows
        n = len(epochs)
        self.arrays = {f: np.zeros((n, length, *t.shape[1:]), t.numpy().dtype)
                       for f in self.FIELDS if (t := getattr(like, f)) is not None}
        self.view = np.zeros((n, length, n_params), np.int16)
        self.written = np.zeros((n, length), bool)

    def add(self, epoch: int, offsets: torch.Tensor, view_params: torch.Tensor, topk: TopKLogits) -> None:
        i, o = self.slot[epoch], offsets.numpy()
        for f, arr in self.arrays.items():
            arr[i, o] = getattr(topk, f).numpy()
        self.view[i, o] = view_params.numpy()
        self.written[i, o] = True

    def take(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, TopKLogits]]:
        """The unit's rows as ``[(offsets, view params, TopKLogits)]``, in offset order (the order its batches
        came in); ``[]`` when none was written."""
        self.open.discard(epoch)
        i = self.slot[epoch]
        sel = np.nonzero(self.written[i])[0]
        if not len(sel):
            return []
        rows = {f: torch.from_numpy(arr[i, sel]) for f, arr in self.arrays.items()}
        tk = TopKLogits(temperatures=self.like.temperatures, num_classes=self.like.num_classes, tail=self.like.tail,
                        **rows)
        return [(torch.from_numpy(sel), torch.from_numpy(self.view[i, sel]), tk)]

    def done(self) -> bool:
        return not self.open


def check_shard_sizes(manifest, shards: list[int]) -> None:
    """Every selected shard exists with the byte size its manifest records (`ShardChangedError` otherwise)."""

    for s in shards:
        url = manifest.shard_url(s)
        ShardCheck(manifest.shards[s], url).check_size(file_size(url))


def forget_damaged_units(url: str, group: str) -> list[tuple[int, int]]:
    """For ``--repair``: verify the group and make its damaged units unfinished (out of their epochs' unit
    indexes, then their markers deleted), so the dump redoes exactly those. Units that are merely unfinished are
    redone anyway."""

    reader = CacheReader(url, group)
    report = verify_cache(url, group)  # invalid metadata raises CacheMetadataError: nothing is deleted
    damaged = [u for u in report.bad_units() if u in reader.markers(refresh=True)]
    unfinish_units(reader.objects, group, damaged)
    return damaged


def _write_unit(writer: CacheWriter, batch: ViewBatch, parts: list) -> None:
    if parts:
        offsets = torch.cat([p[0] for p in parts]).numpy()
        tk = TopKLogits.cat([p[2] for p in parts])
        rows = writer.encode_rows(tk, torch.cat([p[1] for p in parts]).numpy())  # the group's format (1 or 2) and codec
        correct = float((tk.indices[:, 0] == tk.target).sum())
        mass = float(tk.topk_mass(1.0).double().sum())
    else:
        offsets = np.zeros(0, dtype=np.int64)
        rows = writer.empty_rows()
        correct = mass = 0.0
    stats = {"views": float(len(offsets)), "teacher_correct": correct, "topk_mass_sum": mass}
    writer.write_unit(batch.epoch, batch.shard, offsets, rows, batch.unit_length, stats, batch.skipped,
                      replay=batch.replay)


def summarize(reader, written: int, already: int, skipped: int, seconds: float) -> DumpSummary:
    markers = reader.markers(refresh=True)
    views = sum(m.stats.get("views", 0.0) for m in markers.values())
    correct = sum(m.stats.get("teacher_correct", 0.0) for m in markers.values())
    mass = sum(m.stats.get("topk_mass_sum", 0.0) for m in markers.values())
    size = reader.objects.size(reader.group)
    return DumpSummary(
        cache=reader.url,
        group=reader.group,
        units_written=written,
        units_skipped_done=already,
        views_written=int(views),
        bytes_on_disk=size,
        bytes_per_view=size / views if views else math.nan,
        teacher_top1=correct / views if views else math.nan,
        mean_topk_mass=mass / views if views else math.nan,
        samples_skipped=skipped,
        seconds=seconds,
    )
