"""Checkpoints and ``--resume``.

A checkpoint holds everything as tensors and plain containers — model, optimizer, schedule position, RNG states
as tensors, the config as a JSON string — so it loads with ``torch.load(weights_only=True)``. One is written at
every epoch's end and every ``--checkpoint-every`` steps (atomically, `RunDir.save_checkpoint`); mid-epoch ones
also carry every rank's running sums and the soft-label source's pending state (PS-KD rows awaiting their
unit), so a resumed run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from logitcache.cache.reader import CacheReader
from logitcache.errors import LogitcacheError
from logitcache.models.weights import load_checkpoint
from logitcache.replay import cache_identity
from logitcache.runtime.bounded import MAX_RUN_JSON_BYTES, check_length
from logitcache.runtime.dist import DistEnv
from logitcache.train.config import RESUMABLE_CHANGES, TrainConfig
from logitcache.train.rundir import RunDir


@dataclass
class ResumePoint:
    """Where a run (re)starts: epoch, batches of it already trained, optimizer steps taken, and this rank's
    mid-epoch state (running sums, source state) when the checkpoint was taken mid-epoch."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    rank_state: dict[str, Any] | None = None
    resumed: bool = field(default=False)


def rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def config_diff(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    now = cfg.to_json()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    # a run from before --streams read one stream per DataLoader worker (seeded as stream w is now): streams = workers
    defaults["streams"] = max(int(saved.get("workers") or 0), 1)
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}  # settings added since: defaults
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def cache_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between the cache a checkpoint was trained on and the cache now (`replay.cache_identity`:
    weights digest, epochs — 10 grown to 20 would silently remap ``epoch mod E`` —, data, k, ...)."""
    if saved is None:  # a checkpoint from before this check: nothing recorded to compare with
        return []
    return [f"{k}: {saved.get(k)!r} when the checkpoint was taken, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def stored_json(obj: dict[str, Any], key: str, where: str) -> Any:
    """A JSON text a checkpoint stores (``config``, ``cache``), parsed only when a string within
    `MAX_RUN_JSON_BYTES`; otherwise a `LogitcacheError` naming the checkpoint and the entry."""
    text = obj.get(key)
    if not isinstance(text, str):
        raise LogitcacheError(f"{where}: its {key!r} entry is not JSON text; not a logitcache checkpoint?")
    check_length(len(text), MAX_RUN_JSON_BYTES, name=f"{where}: its {key!r} entry", what="checkpoint's JSON entry",
                 error=LogitcacheError)
    try:
        return json.loads(text)
    except ValueError as e:
        raise LogitcacheError(f"{where}: its {key!r} entry is not valid JSON ({e})") from None


def resume(cfg: TrainConfig, run: RunDir, env: DistEnv, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, *, cache: CacheReader | None = None) -> ResumePoint:
    """Load ``RUN/checkpoints/last.pt`` into model and optimizer (and the RNG) when ``--resume`` asks for it.

    A run directory that already holds a run needs ``--resume``; a checkpoint made with another configuration
    (beyond `RESUMABLE_CHANGES`) is refused, naming the differences; so is a ``cache`` that changed since the
    checkpoint (re-dumped with other weights, grown epochs, ...: `cache_changes`); a mid-epoch checkpoint resumes
    only with the rank count it was taken with (the data order depends on it and on ``streams``, which a resume
    keeps, but not on the worker count)."""
    if not cfg.resume:
        if os.path.exists(run.last):
            raise LogitcacheError(f"{cfg.out} already holds a run ({run.last}); pass --resume to continue it, or "
                                  f"choose another --out")
        return ResumePoint()
    if not os.path.exists(run.last):
        return ResumePoint()
    obj = load_checkpoint(run.last)
    saved = stored_json(obj, "config", run.last)
    diff = [d for d in config_diff(saved, cfg) if d.split(":")[0] not in RESUMABLE_CHANGES]
    if diff:
        raise LogitcacheError(f"{run.last} was made with another configuration; refusing to resume:\n  "
                              + "\n  ".join(diff))
    if cache is not None:
        changed = cache_changes(stored_json(obj, "cache", run.last) if "cache" in obj else None,
                                cache_identity(cache))
        if changed:
            raise LogitcacheError(
                f"{run.last} was trained on cache {cfg.cache} group '{cache.group}' as it was then; the cache has "
                f"changed since, refusing to resume:\n  " + "\n  ".join(changed)
                + "\n(start a new run with another --out, or restore the cache the run was trained on)")
    model.load_state_dict(obj["model"])
    optimizer.load_state_dict(obj["optimizer"])
    # batches_done counts the steps done in the pass (--views-per-decode N: N epochs; N = 1: the epoch)
    point = ResumePoint(int(obj["epoch"]), int(obj["batches_done"]), int(obj["step"]), None, True)
    if obj["epoch_complete"]:
        point.epoch += 1
        if point.epoch % cfg.views_per_decode == 0:
            point.batches_done = 0  # the pass is complete too
    if point.batches_done and int(obj["world_size"]) != env.world:
        where = "mid-epoch" if cfg.views_per_decode == 1 else "mid-pass"
        raise LogitcacheError(f"{run.last} was taken {where} with {obj['world_size']} rank(s); resume it with the "
                              f"same rank count (the data order depends on it)")
    if not obj["epoch_complete"]:
        point.rank_state = obj["ranks"][env.rank]
    torch.set_rng_state(obj["rng"]["torch"])
    if env.device.startswith("cuda") and "cuda" in obj["rng"]:
        torch.cuda.set_rng_state(obj["rng"]["cuda"], torch.device(env.device))
    return point


def save(run: RunDir, cfg: TrainConfig, env: DistEnv, model, optimizer, source, epoch: int, batches_done: int,
         step: int, acc: dict[str, Any], *, complete: bool) -> None:
    """Checkpoint (every rank calls this; rank 0 writes). Mid-epoch ones carry every rank's running sums and the
    source's pending state."""
    mine = {"acc": {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu() for k, v in acc.items()},
            "pskd": source.state_dict()}
    ranks = env.all_gather_object(mine)
    if not env.is_main:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"schedule": cfg.schedule, "step": step},  # the learning rate is a pure function of progress
        "epoch": epoch,
        "epoch_complete": complete,
        "batches_done": batches_done,
        "step": step,
        "world_size": env.world,
        "rng": rng_state(env.device),
        "config": json.dumps(cfg.to_json(), sort_keys=True),
        "ranks": ranks if not complete else [],
    }
    if source.identity() is not None:  # the cache trained on, checked again on --resume
        state["cache"] = json.dumps(source.identity(), sort_keys=True)
    run.save_checkpoint(state, "last.pt", *([f"epoch-{epoch:04d}.pt"] if complete else []))
