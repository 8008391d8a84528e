"""DDP lockstep: every rank runs the same optimizer steps although ranks read whole shards of unequal size.

Before each step the ranks agree (one small all-reduce) on the number of samples in this step over all ranks; a
rank that has run out repeats its last batch with weight 0 and frozen batch-norm statistics, so learning rate,
momentum and weights stay equal, and each rank's loss is weighted by ``n_rank · world / n_all`` so the gradient
is the exact mean over the global batch. After each epoch the ranks compare a checksum of their weights.
"""

from __future__ import annotations

import contextlib
import math

import torch

from logitcache.data.shards import ShardDataset
from logitcache.data.split import split_shards
from logitcache.errors import LogitcacheError
from logitcache.runtime.dist import DistEnv


def planned_steps(manifest, shards, seed: int, epoch: int, world: int, batch_size: int, workers: int,
                  views_per_decode: int = 1) -> int:
    """Steps of an epoch — of a pass of ``views_per_decode`` epochs starting at ``epoch`` — when nothing is
    skipped: the most batches any rank's DataLoader yields (lockstep); each worker batches N views per sample."""
    order = ShardDataset(manifest, shards, rank=0, world_size=world, shuffle_seed=seed, epoch=epoch).shard_order()
    nw = max(workers, 1)

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
    """``(samples in this step over all ranks, whether any rank still has data)``."""
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
