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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitcache import schema
from logitcache.errors import LogitcacheError

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
    recipe: str = "imagenet"
    image_size: int | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    value_dtype: str = "float16"
    shards: tuple[int, ...] | None = None
    skip_bad: bool = False
    repair: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {self.topk}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.value_dtype not in schema.VALUE_DTYPES:
            raise ValueError(f"--value-dtype must be one of {schema.VALUE_DTYPES}")

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
        from logitcache.shards import iter_shard
        from logitcache.views import apply_view, sample_view, view_rng

        buffers: dict[int, list] = {e: [] for e in epochs}
        seen: set[int] = set()
        for sample in iter_shard(self.manifest, shard, skip_bad=self.skip_bad):
            seen.add(sample.offset)
            _, h, w = sample.image.shape
            for e in epochs:
                params = sample_view(view_rng(self.seed, e, sample.index), h, w, self.recipe)
                x = apply_view(sample.image, params, self.recipe)
                buffers[e].append((sample.offset, x, sample.label, params.to_array(), f"{sample.url}:{sample.key}"))
                if len(buffers[e]) == self.batch_size:
                    yield _collate(e, shard, buffers[e])
                    buffers[e] = []
        length = self.manifest.shards[shard].num_samples
        skipped = tuple(sorted(set(range(length)) - seen))
        for e in epochs:  # the unit's last batch (possibly empty) carries its length and what was skipped
            yield dataclasses.replace(
                _collate(e, shard, buffers[e], self.recipe), end_of_unit=True, unit_length=length, skipped=skipped
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


# ------------------------------------------------------------------ teacher
def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes): the weights actually used."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def load_teacher(name: str, weights: str | None, num_classes: int, image_size: int, device: str, seed: int):
    from logitcache.models import build_model

    torch.manual_seed(seed)  # a teacher without weights (tests, benchmarks) is still a pure function of the seed
    model = build_model(name, num_classes, weights=weights, image_size=image_size)
    model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def teacher_logits(model, images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: str):
    """Normalise on the device and run the teacher; logits come back as float32 whatever the compute dtype."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    if device.startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x).float()
    return model(x).float()


# ------------------------------------------------------------------ distributed helpers
def dist_env() -> tuple[int, int]:
    """(rank, world) under torchrun (joining a gloo group: the dump only needs barriers), else (0, 1)."""
    from logitcache.shards import rank_and_world

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return rank_and_world()


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


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
    from logitcache.manifest import load_manifest

    manifest = load_manifest(cfg.data)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    views_per_epoch = sum(manifest.shards[s].num_samples for s in shards)
    from logitcache.views import get_recipe

    recipe = get_recipe(cfg.recipe, cfg.image_size)
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
        "raw_bytes_per_view": raw,
        "uncompressed_bytes_upper_bound": int(views_per_epoch * cfg.epochs * raw),
    }


def _temps(cfg: DumpConfig) -> tuple[float, ...]:
    from logitcache.topk import _normalise_temperatures

    return _normalise_temperatures(cfg.temperatures)


def dump(cfg: DumpConfig, *, argv: list[str] | None = None) -> DumpSummary:
    from tqdm import tqdm

    from logitcache.cache import CacheReader, CacheWriter, UnitRows
    from logitcache.manifest import load_manifest
    from logitcache.models import model_normalization
    from logitcache.provenance import provenance, utc_now
    from logitcache.topk import TopKLogits
    from logitcache.views import get_recipe

    t0 = time.perf_counter()
    manifest = load_manifest(cfg.data)
    recipe = get_recipe(cfg.recipe, cfg.image_size)
    temps = _temps(cfg)
    rank, world = dist_env()
    teacher = load_teacher(cfg.teacher, cfg.weights, manifest.num_classes, recipe.image_size, cfg.device, cfg.seed)
    mean, std = (torch.tensor(v, device=cfg.device).view(1, -1, 1, 1) for v in model_normalization(cfg.teacher))
    meta = schema.GroupMeta(
        teacher=cfg.teacher,
        weights=cfg.weights,
        weights_digest=state_dict_digest(teacher),
        num_classes=manifest.num_classes,
        normalization={"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
        recipe=recipe.to_json(),
        param_fields=tuple(recipe.param_fields),
        k=cfg.topk,
        temperatures=temps,
        seed=cfg.seed,
        epochs=cfg.epochs,
        shards=None if cfg.shards is None else tuple(sorted(cfg.shards)),
        value_dtype=cfg.value_dtype,
        index_dtype=schema.index_dtype(manifest.num_classes),
    )
    root = schema.RootMeta(
        manifest.fingerprint, manifest.num_classes, len(manifest.shards), tuple(s.num_samples for s in manifest.shards)
    )
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    if rank == 0:
        # cheap facts first (one size query per shard), so a changed shard stops the dump before the cache is
        # created or its epochs grown; key digests are checked as each shard is read, sha256 by verify --data
        check_shard_sizes(manifest, shards)
        writer = CacheWriter.create_or_open(cfg.out, cfg.group_name, meta, root, manifest.to_json())
    barrier(world)
    if rank != 0:
        writer = CacheWriter.open(cfg.out, cfg.group_name)
    prov = provenance(argv)

    if cfg.repair and rank == 0:
        repaired = forget_damaged_units(cfg.out, cfg.group_name)
        if repaired and cfg.progress:
            print(f"repair: redoing {len(repaired)} damaged unit(s): {repaired}", file=sys.stderr)
    barrier(world)
    finished = writer.finished_units()
    pending: dict[int, list[int]] = defaultdict(list)
    for s in shards[rank::world] if world > 1 else shards:
        for e in range(cfg.epochs):
            if (e, s) not in finished:
                pending[s].append(e)
    n_units = sum(len(v) for v in pending.values())
    n_views = sum(manifest.shards[s].num_samples * len(es) for s, es in pending.items())
    loader = torch.utils.data.DataLoader(
        UnitViews(manifest, dict(pending), recipe, cfg.seed, cfg.batch_size, cfg.skip_bad),
        batch_size=None,
        num_workers=cfg.workers,
        collate_fn=lambda b: b,
        pin_memory=cfg.device.startswith("cuda"),
        persistent_workers=False,
    )
    units: dict[tuple[int, int], list] = defaultdict(list)
    written = 0
    skipped_by_shard: dict[int, int] = {}
    bar = tqdm(
        total=n_views,
        unit="view",
        desc=f"dump {cfg.group_name}",
        disable=not cfg.progress or rank != 0,
        dynamic_ncols=True,
    )
    kill_after = int(os.environ.get(KILL_AFTER_BATCHES_ENV, "0"))  # fault injection for the resume tests
    with torch.inference_mode():
        for n_batch, batch in enumerate(loader, start=1):
            if kill_after and n_batch > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            key = (batch.epoch, batch.shard)
            if len(batch.offsets):
                logits = teacher_logits(teacher, batch.images, mean, std, cfg.device)
                topk = TopKLogits.from_logits(logits, batch.labels, cfg.topk, temps, sample_ids=batch.sample_ids)
                units[key].append((batch.offsets, batch.view_params, topk.to("cpu")))
            bar.update(len(batch.offsets))
            if batch.end_of_unit:
                _write_unit(writer, batch, units.pop(key, []), UnitRows, cfg.value_dtype)
                written += 1
                skipped_by_shard[batch.shard] = len(batch.skipped)
                bar.set_postfix(units=f"{written}/{n_units}")
    bar.close()
    barrier(world)

    skipped_total = sum(skipped_by_shard.values())
    if rank == 0:
        writer.add_provenance(
            {**prov, "end_time": utc_now(), "units_written": written, "samples_skipped": skipped_total}
        )
    barrier(world)
    summary = summarize(
        CacheReader(cfg.out, cfg.group_name), written, len(finished), skipped_total, time.perf_counter() - t0
    )
    return summary


def check_shard_sizes(manifest, shards: list[int]) -> None:
    """Every selected shard exists with the byte size its manifest records (`ShardChangedError` otherwise)."""
    from logitcache.manifest import ShardCheck, file_size

    for s in shards:
        url = manifest.shard_url(s)
        ShardCheck(manifest.shards[s], url).check_size(file_size(url))


def forget_damaged_units(url: str, group: str) -> list[tuple[int, int]]:
    """For ``--repair``: verify the group and delete the markers of damaged units, so the dump redoes exactly
    those (a unit without a marker is unfinished). Units that are merely unfinished are redone anyway."""
    from logitcache.cache import CacheReader
    from logitcache.verify import verify_cache

    try:
        reader = CacheReader(url, group)
        reader.meta  # noqa: B018 - opens the group; a fresh cache has nothing to repair
    except LogitcacheError:
        return []
    report = verify_cache(url, group)
    damaged = [u for u in report.bad_units() if u in reader.markers(refresh=True)]
    for e, s in damaged:
        reader.objects.delete(schema.unit_marker_key(group, e, s))
    return damaged


def _write_unit(writer, batch: ViewBatch, parts: list, UnitRows, value_dtype: str) -> None:
    from logitcache.topk import TopKLogits

    if parts:
        offsets = torch.cat([p[0] for p in parts]).numpy()
        view = torch.cat([p[1] for p in parts]).numpy()
        tk = TopKLogits.cat([p[2] for p in parts])
        lse1 = tk.lse[:, tk.temperatures.index(1.0)]
        rows = UnitRows(
            topk_indices=tk.indices.numpy(),
            topk_logprobs=(tk.logits - lse1[:, None]).numpy().astype(value_dtype),
            target_logprob=tk.target_logprob.numpy().astype(np.float32),
            lse=tk.lse.numpy().astype(np.float32),
            view_params=view.astype(np.int16),
        )
        correct = float((tk.indices[:, 0] == tk.target).sum())
        mass = float(tk.topk_mass(1.0).double().sum())
    else:
        meta = writer.meta
        offsets = np.zeros(0, dtype=np.int64)
        rows = UnitRows(
            np.zeros((0, meta.k)),
            np.zeros((0, meta.k)),
            np.zeros(0),
            np.zeros((0, len(meta.temperatures))),
            np.zeros((0, len(meta.param_fields))),
        )
        correct = mass = 0.0
    stats = {"views": float(len(offsets)), "teacher_correct": correct, "topk_mass_sum": mass}
    writer.write_unit(batch.epoch, batch.shard, offsets, rows, batch.unit_length, stats, batch.skipped)


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
