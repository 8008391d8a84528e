"""Where a training run's soft labels come from — exactly one source per mode:

    CacheSource     --cache     the cache's views replayed (`CachedViews`) with their `TopKLogits` rows
    OnlineSource    --teacher   fresh views (the dump's sampling), the teacher run on the same batch
    PSKDSource      --loss pskd fresh views with last epoch's own predictions (`PredictionStore`)
    FreshSource     otherwise   fresh views, no soft labels (ce, ls, tf-kd, zipf-ls, tf-nkd, uskd)

A source makes each epoch's dataset, turns a batch into the loss's extra inputs (``teacher=`` or
``prev_probs=``), and may record what the student predicted (PS-KD).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from logitcache.cache.reader import CacheReader
from logitcache.cache.verify import check_replay
from logitcache.errors import LogitcacheError, TemperatureNotRecorded
from logitcache.replay import (
    CachedViews,
    CycledViewsWarning,
    FreshViews,
    cache_identity,
    check_cache_covers,
    check_cache_matches,
)
from logitcache.teacher import Teacher
from logitcache.train.config import TrainConfig
from logitcache.train.pskd_store import PredictionStore
from logitcache.views.recipe import Recipe, resolve_recipe


class FreshSource:
    """Fresh views ``sample_view(view_rng(seed, epoch, index))``, no soft labels."""

    mode = "teacher-free"

    def __init__(self, cfg: TrainConfig, recipe: Recipe):
        self.cfg, self.recipe = cfg, recipe

    def dataset(self, manifest, epoch: int, **common) -> torch.utils.data.IterableDataset:
        return FreshViews(manifest, seed=self.cfg.seed, recipe=self.recipe, epoch=epoch, rows=self._rows(epoch),
                          **common)

    def _rows(self, epoch: int):
        return None

    def inputs(self, batch, device: str) -> dict[str, Any]:
        """The loss's extra inputs for this batch (``teacher=`` / ``prev_probs=``)."""
        return {}

    def skipped(self, epoch: int) -> dict[int, int]:
        """Samples per shard that epoch ``epoch``'s data leaves out although they decode (none here)."""
        return {}

    def record(self, epoch: int, batch, logits: torch.Tensor) -> None:
        """Called after each step with the student's logits (PS-KD keeps them)."""

    def finish_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict[str, Any] | None:
        return None

    def identity(self) -> dict[str, Any] | None:
        """What a checkpoint records of the soft labels' source, checked again on ``--resume``."""
        return None


class OnlineSource(FreshSource):
    """Online distillation: the teacher runs on every batch of fresh views (the dump's views with its seed)."""

    mode = "online"

    def __init__(self, cfg: TrainConfig, recipe: Recipe, teacher: Teacher):
        super().__init__(cfg, recipe)
        self.teacher = teacher

    def inputs(self, batch, device: str) -> dict[str, Any]:
        with torch.no_grad():
            return {"teacher": self.teacher.logits(batch.image)}


class PSKDSource(FreshSource):
    """PS-KD: fresh views, each with the student's own prediction on that sample in the previous epoch."""

    def __init__(self, cfg: TrainConfig, recipe: Recipe, store: PredictionStore):
        super().__init__(cfg, recipe)
        self.store = store

    def _rows(self, epoch: int):
        return self.store.source(epoch)

    def inputs(self, batch, device: str) -> dict[str, Any]:
        return {} if batch.soft is None else {"prev_probs": batch.soft.to(device, non_blocking=True).probs(1.0)}

    def record(self, epoch: int, batch, logits: torch.Tensor) -> None:
        self.store.record(epoch, batch.index, logits, batch.target, batch.view)

    def finish_epoch(self, epoch: int) -> None:
        self.store.finish_epoch(epoch)

    def state_dict(self) -> dict:
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state)


class CacheSource(FreshSource):
    """The cache's own views, replayed pixel for pixel, with the teacher's `TopKLogits` rows."""

    mode = "cache"

    def __init__(self, cfg: TrainConfig, recipe: Recipe, cache: CacheReader):
        super().__init__(cfg, recipe)
        self.cache = cache

    def dataset(self, manifest, epoch: int, **common) -> torch.utils.data.IterableDataset:
        with warnings.catch_warnings():  # the run says so itself, once, in its log and config.json
            warnings.simplefilter("ignore", CycledViewsWarning)
            return CachedViews(manifest, self.cache, recipe=self.recipe, epoch=epoch, **common)

    def skipped(self, epoch: int) -> dict[int, int]:
        """The samples the dump skipped (its markers list them): replay leaves them out."""
        markers = self.cache.epoch_markers(self.cache.cached_epoch(epoch))
        return {s: len(m.skipped) for s, m in markers.items() if m.skipped}

    def inputs(self, batch, device: str) -> dict[str, Any]:
        return {"teacher": batch.soft.to(device, non_blocking=True)}  # the cache's rows for exactly these views

    def describe(self) -> dict[str, Any]:
        m = self.cache.meta
        return {"url": self.cfg.cache, "group": self.cache.group, "teacher": m.teacher, "weights": m.weights,
                "weights_digest": m.weights_digest, "epochs": m.epochs, "k": m.k,
                "temperatures": list(m.temperatures), "seed": m.seed, "teacher_precision": m.teacher_precision}

    def identity(self) -> dict[str, Any]:
        return cache_identity(self.cache)


def open_cache(cfg: TrainConfig, manifest, spec, loss_args, shards) -> tuple[CacheReader, Recipe, list[str]]:
    """The cache of a ``--cache`` run, checked against the data, the shards trained on, the requested recipe
    (flags that agree with the cache are accepted, a disagreement is refused naming both values) and the loss's
    temperatures; returns ``(reader, the cache's recipe, notes for the log)``."""
    cache = CacheReader(cfg.cache, cfg.group)
    check_cache_matches(cache, manifest)
    recipe = resolve_recipe(cfg.recipe, cfg.image_size, cached=cache.meta.recipe,
                            cached_where=f"cache {cfg.cache} group '{cache.group}'")
    check_cache_covers(cache, shards, explicit=cfg.shards is not None)
    check_replay(cache, manifest, recipe, once=True)  # these pixels are the teacher's, on this machine
    missing = [t for t in spec.teacher_temperatures(loss_args)
               if not any(math.isclose(t, u, rel_tol=1e-6) for u in cache.meta.temperatures)]
    if missing:
        raise TemperatureNotRecorded(
            f"loss '{spec.name}' reads the teacher at temperature(s) {missing}, which cache {cfg.cache} group "
            f"'{cache.group}' did not record (it has {list(cache.meta.temperatures)}); re-dump with "
            f"--temperatures including them")
    if cache.meta.epochs % cfg.views_per_decode:
        divisors = [d for d in range(1, cache.meta.epochs + 1) if cache.meta.epochs % d == 0]
        raise LogitcacheError(
            f"--views-per-decode {cfg.views_per_decode} does not divide the {cache.meta.epochs} epoch(s) of views "
            f"cache {cfg.cache} group '{cache.group}' holds (a pass would straddle the cycle); use one of {divisors}")
    notes = []
    if cfg.epochs > cache.meta.epochs:
        notes.append(f"the cache holds {cache.meta.epochs} epoch(s) of views; training for {cfg.epochs} epochs "
                     f"replays them cyclically (epoch e uses cached epoch e mod {cache.meta.epochs})")
    return cache, recipe, notes
