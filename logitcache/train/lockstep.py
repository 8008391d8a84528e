"""DDP lockstep: every rank runs the same optimizer steps although ranks read whole shards of unequal size.

Each step's global sample count is known before the epoch (`plan_epoch`): shard order, split over ranks and streams
(`replay`'s ``streams``) and sample counts come from the manifest (less the samples a cache's markers say the dump
skipped), and the batch sizes follow from them (`loader_batch_sizes`: the streams' round robin), so the ranks agree
without talking — no collective, no host sync per step. Only with ``--skip-bad``, where a sample may fail to decode,
are the counts unknown; then the ranks agree before each step (`agree_on_step`, one small all-reduce). A rank that
has run out repeats its last batch with weight 0 and frozen batch-norm statistics, so learning rate, momentum and
weights stay equal, and each rank's loss is weighted by ``n_rank · world / n_all`` so the gradient is the exact mean
over the global batch. After each epoch the ranks compare a checksum of their weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from logitcache.data.shards import ShardDataset
from logitcache.data.split import split_shards
from logitcache.errors import LogitcacheError
from logitcache.runtime.dist import DistEnv


def loader_batch_sizes(worker_counts: list[int], batch_size: int) -> list[int]:
    """Sizes of the batches, in order, when reader r yields ``worker_counts[r]`` samples: each reader batches its
    own samples (its last batch partial) and one batch is taken from each reader that still has one, in reader
    order, round after round. Readers: a rank's streams (`replay.stream_batches`), or the workers of a
    ``DataLoader(IterableDataset, batch_size, num_workers=len(worker_counts))`` (its in-order round robin; one
    count stands for ``num_workers=0``)."""
    per = [[min(batch_size, n - j * batch_size) for j in range(-(-n // batch_size))] for n in worker_counts]
    return [p[r] for r in range(max((len(p) for p in per), default=0)) for p in per if r < len(p)]


@dataclass(frozen=True)
class LockstepPlan:
    """An epoch's steps, known before it starts: every rank's batch sizes, in order."""

    sizes: tuple[tuple[int, ...], ...]  # per rank

    @property
    def steps(self) -> int:
        """Optimizer steps of the epoch: the most batches any rank has (the others repeat with weight 0)."""
        return max(len(s) for s in self.sizes)

    def batch_size(self, rank: int, step: int) -> int:
        """Samples rank ``rank`` trains on at ``step``; 0 once it has run out (it repeats its last batch)."""
        mine = self.sizes[rank]
        return mine[step] if step < len(mine) else 0

    def total(self, step: int) -> int:
        """Samples all ranks together train on at ``step``."""
        return sum(s[step] for s in self.sizes if step < len(s))


def plan_epoch(manifest, shards, seed: int, epoch: int, world: int, batch_size: int, streams: int,
               skipped: dict[int, int] | None = None, views_per_decode: int = 1) -> LockstepPlan:
    """The lockstep plan of an epoch (of a pass of ``views_per_decode`` epochs from ``epoch``) in which every
    sample decodes: the shard order and split over ranks and ``streams`` of `ShardDataset` / `split_shards`,
    ``views_per_decode × num_samples − skipped[shard]`` items per shard (``skipped``: the views a cache's
    markers say the dump left out, over the pass's epochs; replay leaves them out too)."""
    skipped = skipped or {}
    order = ShardDataset(manifest, shards, rank=0, world_size=world, shuffle_seed=seed, epoch=epoch).shard_order()
    nw = max(streams, 1)

    def samples(rank: int, worker: int) -> int:
        return sum(views_per_decode * manifest.shards[s].num_samples - skipped.get(s, 0)
                   for s in split_shards(order, rank, world, worker, nw))

    return LockstepPlan(tuple(tuple(loader_batch_sizes([samples(r, w) for w in range(nw)], batch_size))
                              for r in range(world)))


def planned_steps(manifest, shards, seed: int, epoch: int, world: int, batch_size: int, streams: int,
                  views_per_decode: int = 1) -> int:
    """Steps of an epoch — of a pass of ``views_per_decode`` epochs starting at ``epoch`` — when nothing is
    skipped: the most batches any rank yields (lockstep); each of its ``streams`` batches N views per sample."""
    order = ShardDataset(manifest, shards, rank=0, world_size=world, shuffle_seed=seed, epoch=epoch).shard_order()
    nw = max(streams, 1)

    def batches(r: int, w: int) -> int:
        samples = sum(manifest.shards[s].num_samples for s in split_shards(order, r, world, w, nw))
        return math.ceil(views_per_decode * samples / batch_size)

    return max(sum(batches(r, w) for w in range(nw)) for r in range(world))


def pass_epoch_ends(steps: int, views_per_decode: int) -> list[int]:
    """The step, counted in the pass, at which each of its ``views_per_decode`` logged epochs ends (the last one:
    when the data does, `planned_steps` when nothing is skipped). With N = 1: ``[steps]``."""
    n = views_per_decode
    return [round((k + 1) * steps / n) for k in range(n)]


def agree_on_step(env: DistEnv, n: int, has_batch: bool) -> tuple[float, bool]:
    """``(samples in this step over all ranks, whether any rank still has data)``: the per-step agreement, for
    epochs whose counts are not known in advance (``--skip-bad``)."""
    n_all, active = env.all_sum([float(n), float(has_batch)])
    return n_all, active > 0


@contextlib.contextmanager
def frozen_bn(model: torch.nn.Module, frozen: bool):
    """Batch-norm running statistics unchanged by the forward passes inside (a lockstep rank's repeat batch)."""
    if not frozen:
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def weights_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.state_dict().values() if p.is_floating_point()))


def sync_after_epoch(env: DistEnv, model: torch.nn.Module, epoch: int) -> None:
    """Make batch-norm buffers rank 0's (DDP syncs them at each forward's start, so after the last one they may
    differ) and check that every rank holds the same weights."""
    if env.world == 1:
        return
    for buffer in model.buffers():
        env.broadcast_(buffer, 0)
    sums = env.all_gather_floats(weights_checksum(model))
    if len(set(sums)) != 1:
        raise LogitcacheError(f"ranks hold different weights after epoch {epoch}: {sums}")
