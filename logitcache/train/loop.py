"""Stage 2: train a student — from a cache, online with a teacher, or teacher-free — in one loop.

    views   CachedViews (the cache's views, replayed) | FreshViews (sample_view(view_rng(seed, e, i)))
    soft    exactly one source per mode (`sources`): the cache's rows, the teacher on the same batch, PS-KD's
            previous-epoch predictions, or nothing
    loss    terms = spec.terms(student, target, teacher=..., weak=..., prev_probs=...);  loss = Σ terms

`train` reads top to bottom: set up (`build`), then for each pass `train_pass` (the step loop), and at each of its
epochs' end validation, one metrics line and a checkpoint. A pass is ``--views-per-decode`` N epochs whose views
come from one decode of each image (N = 1: a pass is an epoch); it is logged as N epochs of ``planned_steps / N``
steps each, each an epoch's worth of views mixing the pass's N view epochs, and a checkpoint inside a pass resumes
inside it (`checkpoint`). Determinism: the data order is a pure function of (seed, epoch, rank count, ``--streams``)
(`replay`; not of ``--workers``), the model is initialised from ``torch.manual_seed(seed)``, and the learning rate
is a pure function of the progress, so ``--resume`` (`checkpoint`) reaches the same weights as an uninterrupted run
on the CPU. DDP (torchrun; gloo on CPU, NCCL on GPU) runs in lockstep (`lockstep`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from logitcache.data.manifest import Manifest, load_manifest
from logitcache.errors import LogitcacheError, NonFiniteLossError, RecipeError
from logitcache.eval.evaluate import evaluate
from logitcache.losses import LossSpec, get_loss, parse_loss_args
from logitcache.losses.label_smoothing import label_smoothing
from logitcache.models.zoo import attach_weak_head, build_model, model_normalization
from logitcache.replay import stream_batches
from logitcache.runtime import precision
from logitcache.runtime.dist import DistEnv, init_distributed
from logitcache.runtime.provenance import provenance, utc_now
from logitcache.teacher import Teacher
from logitcache.train import checkpoint, syncs
from logitcache.train.config import TrainConfig, learning_rate, make_optimizer
from logitcache.train.lockstep import (
    agree_on_step,
    frozen_bn,
    pass_epoch_ends,
    plan_epoch,
    planned_steps,
    sync_after_epoch,
)
from logitcache.train.pskd_store import STORE_NAME, PredictionStore
from logitcache.train.rundir import RunDir
from logitcache.train.sources import CacheSource, FreshSource, OnlineSource, PSKDSource, open_cache
from logitcache.views.mixing import mixed_targets
from logitcache.views.recipe import resolve_recipe

#: tests only: SIGKILL the run right before its N+1-th optimizer step (a real kill at a reproducible point)
KILL_AFTER_STEPS_ENV = "LOGITCACHE_TEST_KILL_AFTER_STEPS"
#: steps between progress-bar updates (each one syncs with the device once)
LOG_EVERY = 10


@dataclass
class Setup:
    """Everything an epoch needs, built once by `build`."""

    manifest: Manifest
    shards: list[int]
    spec: LossSpec
    loss_args: dict[str, Any]
    model: torch.nn.Module  # what the step calls (DDP / compiled wrapper)
    raw_model: torch.nn.Module  # the module whose weights are saved
    optimizer: torch.optim.Optimizer
    source: FreshSource
    mean: torch.Tensor
    std: torch.Tensor
    val: Manifest | None
    recipe: Any
    notes: list[str] = field(default_factory=list)
    guard: FiniteLossGuard = field(default_factory=lambda: FiniteLossGuard())


def train(cfg: TrainConfig, *, argv: list[str] | None = None, stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the last metrics line. ``stop_after_epochs``: end this process after that
    many epochs (checkpointed), e.g. for time-limited jobs; ``resume=True`` continues."""
    env = init_distributed(cfg.device)
    run = RunDir(cfg.out)
    s, point = build(cfg, env, run)
    for note in s.notes:
        log(env, note)
    if env.is_main:
        write_run_config(run, cfg, env, s, point, argv)
    last_line: dict[str, Any] = {}
    start_epoch, n_views, stop = point.epoch, cfg.views_per_decode, False
    for pass_start in range(start_epoch - start_epoch % n_views, cfg.epochs, n_views):
        # a pass: N epochs' worth of views, each image decoded once (N = --views-per-decode; 1: a pass = an epoch)
        for epoch, train_stats, lr, step, done in train_pass(cfg, env, run, s, pass_start, point):
            point = checkpoint.ResumePoint(epoch=epoch + 1, step=step)
            sync_after_epoch(env, s.raw_model, epoch)
            val_stats, bins = None, None
            if s.val is not None:
                val_stats, bins = evaluate(s.raw_model, s.val, s.recipe, batch_size=cfg.batch_size,
                                           workers=cfg.workers, device=env.device, skip_bad=cfg.skip_bad,
                                           normalization=(s.mean.flatten().tolist(), s.std.flatten().tolist()))
                s.raw_model.train()  # the pass may go on
            last_line = {"epoch": epoch, "step": step, "lr": lr, "train": train_stats, "val": val_stats,
                         "cache_epoch": s.source.cache.cached_epoch(epoch) if isinstance(s.source, CacheSource)
                         else None}
            if n_views > 1:  # every logged epoch of a pass mixes the views of the pass's N epochs
                last_line.update(pass_fields(s, epoch, n_views))
                # counted per pass, on its last epoch: the views it could not train (N per sample, minus trained)
                train_stats["samples_skipped"] = pass_skipped(run, s, epoch, n_views, train_stats) if done == 0 else 0
            if env.is_main:
                report_epoch(run, env, last_line, bins)
            # done: steps of the pass trained (0 once it is over), so a resume continues inside the pass
            s.guard.flush(epoch, step)  # never save weights after a non-finite loss
            checkpoint.save(run, cfg, env, s.raw_model, s.optimizer, s.source, epoch, done, step, {}, complete=True)
            if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
                stop = True
                break
        if stop:
            break
    if not last_line and run.metrics():  # a --resume of a finished run: nothing left to do
        log(env, f"all {cfg.epochs} epoch(s) are done already")
        last_line = run.metrics()[-1]
    if env.is_main:
        config = run.read_json("config.json")
        config["provenance"][-1]["end_time"] = utc_now()
        config["samples_skipped_per_epoch"] = {str(m["epoch"]): m["train"]["samples_skipped"] for m in run.metrics()}
        run.write_json("config.json", config)
    env.close()
    return last_line


def train_pass(cfg: TrainConfig, env: DistEnv, run: RunDir, s: Setup, pass_start: int,
               point: checkpoint.ResumePoint) -> Iterator[tuple[int, dict[str, Any], float, int, int]]:
    """The optimizer steps of one pass (``--views-per-decode`` N epochs from ``pass_start``) in lockstep. At each
    of its N logged epochs' end (step ``pass_epoch_ends``, the same on every rank; the last one when the data
    runs out) yields ``(epoch, train figures summed over ranks, last lr, step, steps of the pass done — 0 at its
    end)``; the loader lives on while the caller validates and checkpoints."""
    n_views = cfg.views_per_decode
    loader, n_steps = pass_loader(cfg, env, s, pass_start)
    ends = pass_epoch_ends(n_steps, n_views)
    epoch = max(point.epoch, pass_start)
    plan = pass_plan(cfg, env, s, pass_start)
    # running sums (float64, on the device: no host sync per step): samples, correct, Σ term·n, seconds
    acc: dict[str, torch.Tensor] = {}
    seconds, step, i = 0.0, point.step, point.batches_done if point.epoch >= pass_start else 0
    if point.rank_state is not None and point.epoch >= pass_start:
        acc = {k: v.to(env.device) for k, v in point.rank_state["acc"].items() if k != "seconds"}
        seconds = float(point.rank_state["acc"].get("seconds", 0.0))
    s.raw_model.train()
    bar = epoch_bar(cfg, env, ends, pass_start, epoch, i)
    batches, last_batch = iter(loader), None
    for _ in range(i):  # a mid-epoch/mid-pass resume: these batches were trained before the checkpoint
        last_batch = next(batches, None) or last_batch
    kill_after = int(os.environ.get(KILL_AFTER_STEPS_ENV, "0"))
    t0 = time.perf_counter()
    lr = learning_rate(cfg, pass_start + i * n_views / n_steps, n_views / n_steps)
    while plan is None or i < plan.steps:
        if kill_after and step >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        batch, n, n_all = next_batch(batches, plan, env, epoch, i)
        if n_all == 0:
            break
        repeat = batch is None  # this rank ran out of shards: keep in lockstep with weight 0
        if repeat and last_batch is None:
            raise LogitcacheError(f"rank {env.rank} has no samples to keep in lockstep with (all skipped?)")
        batch = last_batch if repeat else batch
        last_batch = batch
        lr = learning_rate(cfg, pass_start + i * n_views / n_steps, n_views / n_steps)
        terms, logits, loss = optimizer_step(cfg, env, s, batch, epoch, lr, weight=n * env.world / n_all,
                                             repeat=repeat)
        step, i = step + 1, i + 1
        if not repeat:
            accumulate(acc, terms, logits, batch.target.to(env.device, non_blocking=True), n, env.device)
            s.source.record(epoch, batch, logits)
        else:  # every rank sums the same terms at the epoch's end, even one that ran out of data in it
            for k in terms:
                acc.setdefault(k, torch.zeros((), dtype=torch.float64, device=env.device))
        bar.update(1)
        if i % LOG_EVERY == 0 or cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            syncs.mark("display")  # the one place a step may wait for the device: every LOG_EVERY steps
            s.guard.flush(epoch, step)
            show_progress(bar, epoch, step, terms, loss, lr, acc, seconds + time.perf_counter() - t0, env.world)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint.save(run, cfg, env, s.raw_model, s.optimizer, s.source, epoch, i, step,
                            {**acc, "seconds": seconds + time.perf_counter() - t0}, complete=False)
        if epoch < pass_start + n_views - 1 and i >= ends[epoch - pass_start]:  # a logged epoch ends inside the pass
            bar.close()
            yield epoch, epoch_stats(env, acc, seconds + time.perf_counter() - t0, s), lr, step, i
            epoch, acc, seconds = epoch + 1, {}, 0.0
            bar = epoch_bar(cfg, env, ends, pass_start, epoch, i)
            t0 = time.perf_counter()
    syncs.mark("data")
    if plan is not None and next(batches, None) is not None:
        raise LogitcacheError(f"rank {env.rank}, epoch {epoch}: the data holds more batches than the plan (from the "
                              f"manifest and the cache's markers) of {len(plan.sizes[env.rank])}")
    syncs.mark(None)
    bar.close()
    s.source.finish_epoch(epoch)
    env.barrier()  # next epoch's readers may read units another rank wrote (PS-KD)
    seconds += time.perf_counter() - t0
    while epoch < pass_start + n_views - 1:  # the data ran out before the pass's planned steps (skipped samples)
        yield epoch, epoch_stats(env, acc, seconds, s), lr, step, i
        epoch, acc, seconds = epoch + 1, {}, 0.0
    yield epoch, epoch_stats(env, acc, seconds, s), lr, step, 0


def pass_plan(cfg: TrainConfig, env: DistEnv, s: Setup, pass_start: int):
    """Every rank's batch sizes in the pass, known before it unless a sample may fail to decode (``--skip-bad``,
    None: the ranks then agree before each step, one all-reduce per step)."""
    if cfg.skip_bad:
        return None
    skipped: dict[int, int] = {}
    for e in range(pass_start, pass_start + cfg.views_per_decode):
        for shard, count in s.source.skipped(e).items():
            skipped[shard] = skipped.get(shard, 0) + count
    return plan_epoch(s.manifest, s.shards, cfg.seed, pass_start, env.world, cfg.batch_size, cfg.streams, skipped,
                      cfg.views_per_decode)


def next_batch(batches, plan, env: DistEnv, epoch: int, i: int):
    """``(batch or None, its samples, the step's samples over all ranks — 0: the pass is over)``; from here to the
    display the step makes no host-device sync (tests/test_hot_path.py counts them)."""
    syncs.mark("data")
    batch = next(batches, None) if plan is None or plan.batch_size(env.rank, i) else None
    syncs.mark("step")
    n = 0 if batch is None else len(batch.target)
    if plan is None:
        n_all, active = agree_on_step(env, n, batch is not None)
        return batch, n, n_all if active else 0
    if n != plan.batch_size(env.rank, i):
        raise LogitcacheError(f"rank {env.rank}, epoch {epoch}, step {i}: the data gave a batch of {n} sample(s) "
                              f"where the plan (from the manifest and the cache's markers) expects "
                              f"{plan.batch_size(env.rank, i)}")
    return batch, n, plan.total(i)


def pass_loader(cfg: TrainConfig, env: DistEnv, s: Setup, pass_start: int):
    """The batches of the pass starting at ``pass_start`` (its views, their soft labels) in the order of its
    ``--streams`` whatever ``--workers`` (`stream_batches`), and its planned steps."""
    n_views = cfg.views_per_decode
    common = dict(shards=s.shards, rank=env.rank, world_size=env.world, skip_bad=cfg.skip_bad,
                  shuffle_seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, return_items=True,
                  views_per_decode=n_views, batch_size=cfg.batch_size, streams=cfg.streams)
    dataset = s.source.dataset(s.manifest, pass_start, **common)
    try:
        dataset.check_spread()
    except ValueError as e:
        raise LogitcacheError(str(e)) from None
    batches = stream_batches(
        dataset, num_workers=cfg.workers, pin_memory=env.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + pass_start),  # leaves the global RNG alone
    )
    return batches, planned_steps(s.manifest, s.shards, cfg.seed, pass_start, env.world, cfg.batch_size,
                                  cfg.streams, n_views)


def epoch_bar(cfg: TrainConfig, env: DistEnv, ends: list[int], pass_start: int, epoch: int, done: int):
    """The progress bar of one logged epoch (its steps inside the pass)."""
    begin = ends[epoch - pass_start - 1] if epoch > pass_start else 0
    return tqdm(total=ends[epoch - pass_start] - begin, initial=done - begin, desc=f"epoch {epoch}", unit="step",
                dynamic_ncols=True, disable=not cfg.progress or not env.is_main, leave=False)


def pass_fields(s: Setup, epoch: int, n_views: int) -> dict[str, Any]:
    """A logged epoch's place in its pass; with a cache, the cached epochs whose views the pass mixes."""
    first = epoch - epoch % n_views
    cached = ([s.source.cache.cached_epoch(e) for e in range(first, first + n_views)]
              if isinstance(s.source, CacheSource) else None)
    return {"pass": epoch // n_views, "views_per_decode": n_views, "cache_epoch": cached}


def pass_skipped(run: RunDir, s: Setup, epoch: int, n_views: int, stats: dict[str, Any]) -> int:
    """Views of the pass ending with ``epoch`` that were not trained: N per sample minus those its logged
    epochs trained (read back from metrics.jsonl for the earlier ones, so a resumed pass counts them too)."""
    first = epoch - epoch % n_views
    before = sum(m["train"]["samples"] for m in run.metrics() if first <= m["epoch"] < epoch)
    return n_views * sum(s.manifest.shards[i].num_samples for i in s.shards) - before - stats["samples"]


def optimizer_step(cfg: TrainConfig, env: DistEnv, s: Setup, batch, epoch: int, lr: float, *, weight: float,
                   repeat: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward (the student on the view, the soft labels from the run's one source), the weighted backward
    (``weight`` = this rank's share of the global batch, 0 for a lockstep repeat), clip, step."""
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    target = batch.target.to(env.device, non_blocking=True)
    x = precision.normalize_on_device(batch.image, s.mean, s.std, env.device)
    with frozen_bn(s.raw_model, repeat), precision.autocast(env.device):
        out = s.model(x)
    logits, weak = (out[0].float(), out[1].float()) if isinstance(out, tuple) else (out.float(), None)
    labels = target
    if s.recipe.mixes:  # Mixup/CutMix: λ-mixed (box-area λ) label scores, smoothed as timm's mixup_target
        labels = mixed_targets(target, batch.partner_target.to(env.device), batch.lam, logits.shape[1],
                               cfg.label_smoothing)
    terms = s.spec.terms(logits, labels, args=s.loss_args, weak=weak, votes=None, epoch=epoch, epochs=cfg.epochs,
                         ce_weight=cfg.ce_weight, loss_weight=cfg.loss_weight, **s.source.inputs(batch, env.device))
    if cfg.label_smoothing > 0 and "ce" in terms and not s.recipe.mixes:
        ce_weight = s.spec.ce_weight if cfg.ce_weight is None else cfg.ce_weight
        terms["ce"] = ce_weight * label_smoothing(logits, target, epsilon=cfg.label_smoothing)
    loss = sum(terms.values())
    s.guard.check(env, loss, terms, epoch)  # a non-finite loss never reaches the optimizer
    s.optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), cfg.clip_grad)
    s.optimizer.step()
    return terms, logits, loss


def accumulate(acc: dict[str, torch.Tensor], terms, logits, target, n: int, device: str) -> None:
    """Add one batch to the epoch's running sums (on the device: no host sync)."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    for k, v in terms.items():
        acc[k] = acc.get(k, zero) + v.detach().double() * n
    acc["n"] = acc.get("n", zero) + n
    acc["correct"] = acc.get("correct", zero) + (logits.detach().argmax(1) == target).sum()


class FiniteLossGuard:
    """Every step's loss is checked for finiteness; a non-finite one stops the run (`NonFiniteLossError`) and no
    weights are saved after it.

    The check costs no host sync and no collective per step (issue 14; `syncs` counts them): the flag
    (``~isfinite(loss)``) accumulates on the device and is read — all-reduced across ranks first, so every rank
    stops at once — at the sync points the loop already has: the progress update every `LOG_EVERY` steps and
    before every checkpoint. The run therefore stops within `LOG_EVERY` steps of a non-finite loss and never
    saves the weights those steps produced (on the CPU too: the same path everywhere, so a CPU run shows what a
    GPU run does)."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.env: DistEnv | None = None

    def check(self, env: DistEnv, loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int) -> None:
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        self.pending = bad if self.pending is None else self.pending + bad
        self.env = env

    def flush(self, epoch: int, step: int) -> None:
        """Read the device flag (one sync; one all-reduce under DDP): raise if any step since the last read had a
        non-finite loss on any rank."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if self.env is not None and self.env.world > 1:
            torch.distributed.all_reduce(pending)
        if float(pending) > 0:
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, at or before step {step} {_NONFINITE_HINT}")


_NONFINITE_HINT = ("— the run stops here and these weights are not saved (the last checkpoint, if any, is the last "
                   "finite state). Lower --lr, add --clip-grad, or check the soft labels with `logitcache verify`")


def show_progress(bar, epoch: int, step: int, terms, loss, lr: float, acc, elapsed: float, world: int) -> None:
    """Every `LOG_EVERY` steps: update the progress bar (one device sync)."""
    seen = float(acc["n"]) if "n" in acc else 0.0
    bar.set_postfix({**{k: f"{float(v.detach()):.4f}" for k, v in terms.items()}, "lr": f"{lr:.3g}",
                     "img/s": f"{seen * world / max(elapsed, 1e-9):.0f}"}, refresh=False)


def epoch_stats(env: DistEnv, acc, seconds: float, s: Setup) -> dict[str, Any]:
    """The epoch's training figures, summed over ranks."""
    term_names = sorted(k for k in acc if k not in ("n", "correct"))
    sums = env.all_sum([float(acc.get(k, 0.0)) for k in ("n", "correct", *term_names)])
    seen = sums[0]
    stats = {k: sums[2 + j] / max(seen, 1) for j, k in enumerate(term_names)}
    stats.update({
        "loss": sum(stats.values()), "top1": sums[1] / max(seen, 1), "samples": int(seen),
        "samples_skipped": int(sum(s.manifest.shards[i].num_samples for i in s.shards) - seen), "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else float("nan"),
    })
    return stats


# ------------------------------------------------------------------ set-up and reporting
def build(cfg: TrainConfig, env: DistEnv, run: RunDir) -> tuple[Setup, checkpoint.ResumePoint]:
    """Data, loss, recipe, soft-label source, student, optimizer, and the resume point."""
    spec, loss_args = get_loss(cfg.loss), parse_loss_args(cfg.loss, cfg.loss_args)
    manifest = load_manifest(cfg.data)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    if len(shards) < env.world:
        raise LogitcacheError(f"{len(shards)} shard(s) cannot feed {env.world} ranks (ranks read whole shards): "
                              f"use at most {len(shards)} processes, or data with more shards")
    num_classes, notes = manifest.num_classes, []
    cache = teacher = None
    if cfg.cache:
        cache, recipe, notes = open_cache(cfg, manifest, spec, loss_args, shards)
    else:  # the one recipe rule: --recipe, else the data's default_recipe, else a clear error
        recipe = resolve_recipe(cfg.recipe, cfg.image_size, default=manifest.default_recipe,
                                default_where=f"the manifest of {cfg.data}")
    if spec.name == "pskd" and recipe.mixes:
        raise RecipeError(
            f"--loss pskd cannot train on recipe {recipe.name!r} (v{recipe.version}), which mixes every view with "
            f"another sample (Mixup/CutMix): PS-KD's target for a sample is the student's own prediction on that "
            f"sample in the previous epoch, but a mixed view's prediction belongs to two samples, so it would "
            f"become next epoch's target for an image that was partly another sample. Use a recipe without "
            f"mixing (imagenet, small) with pskd")
    if cfg.teacher:
        teacher = Teacher.load(cfg.teacher, cfg.weights, num_classes, recipe.image_size, env.device, cfg.seed,
                               precision=cfg.teacher_precision)
        if cfg.weights is None:
            notes.append(f"teacher {cfg.teacher} has no --weights: randomly initialised from seed {cfg.seed}")
    if "votes" in spec.needs:
        notes.append("zipf-ls ranks classes by the student's own logits (votes=None): the models here do not expose "
                     "per-pixel votes of their last feature map")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.student, num_classes, weights=cfg.init, image_size=recipe.image_size)
    if "weak" in spec.needs:
        model = attach_weak_head(model, cfg.student, num_classes, image_size=recipe.image_size)
    model = precision.prepare_model(model, env.device)
    mean, std = (torch.tensor(v, device=env.device).view(1, -1, 1, 1) for v in model_normalization(cfg.student))
    optimizer = make_optimizer(cfg, model)
    point = checkpoint.resume(cfg, run, env, model, optimizer, cache=cache)
    if cfg.resume and not point.resumed:
        notes.append(f"--resume: no checkpoint in {run.checkpoints}; starting from scratch")
    elif point.resumed:
        notes.append(f"resuming {run.last}: epoch {point.epoch}, {point.batches_done} batch(es) done, "
                     f"step {point.step}")
    if cache is not None:
        source = CacheSource(cfg, recipe, cache)
    elif teacher is not None:
        source = OnlineSource(cfg, recipe, teacher)
    elif spec.name == "pskd":
        store = PredictionStore.create(
            run.file(STORE_NAME), manifest, k=cfg.pskd_topk or num_classes, recipe=recipe, seed=cfg.seed,
            student=cfg.student, normalization={"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
            env=env, fresh=not point.resumed)
        source = PSKDSource(cfg, recipe, store)
        if point.rank_state is not None:
            source.load_state_dict(point.rank_state["pskd"])
    else:
        source = FreshSource(cfg, recipe)
    wrapped = model
    if env.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.startswith("cuda") else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    val = load_manifest(cfg.val) if cfg.val else None
    return Setup(manifest, shards, spec, loss_args, wrapped, model, optimizer, source, mean, std, val, recipe,
                 notes), point


def write_run_config(run: RunDir, cfg: TrainConfig, env: DistEnv, s: Setup, point: checkpoint.ResumePoint,
                     argv: list[str] | None) -> None:
    """RUN/config.json: the config, what it resolved to, and one provenance entry per (re)start."""
    os.makedirs(run.checkpoints, exist_ok=True)
    config = run.read_json("config.json") if point.resumed and os.path.exists(run.file("config.json")) else {}
    config.update(cfg.to_json())
    config["resolved"] = {
        "mode": cfg.mode, "loss_args": s.loss_args,
        "ce_weight": s.spec.ce_weight if cfg.ce_weight is None else cfg.ce_weight,
        "loss_weight": s.spec.loss_weight if cfg.loss_weight is None else cfg.loss_weight,
        "recipe": s.recipe.to_json(), "num_classes": s.manifest.num_classes, "world_size": env.world,
        "device": env.device, "student_parameters": sum(p.numel() for p in s.raw_model.parameters()),
        "normalization": {"mean": s.mean.flatten().tolist(), "std": s.std.flatten().tolist()},
        "cache": s.source.describe(),
        "zipf_votes": "logits" if "votes" in s.spec.needs else None,
        "notes": [n for n in s.notes if not n.startswith(("resuming ", "--resume"))],
    }
    resumed_from = {"epoch": point.epoch, "batches": point.batches_done} if point.resumed else None
    config["provenance"] = [*config.get("provenance", []), {**provenance(argv), "resumed_from": resumed_from}]
    run.write_json("config.json", config)
    run.keep_metrics_before(point.epoch)


def report_epoch(run: RunDir, env: DistEnv, line: dict[str, Any], bins) -> None:
    run.append_metrics(line)
    if bins is not None:
        run.write_json("val_reliability.json", bins.to_dict())
    t, v = line["train"], line["val"]
    val_text = "" if v is None else f"; val top1 {v['top1']:.4f} nll {v['nll']:.4f} ece {v['ece']:.4f} (n={v['n']})"
    log(env, f"epoch {line['epoch']}: loss {t['loss']:.4f} top1 {t['top1']:.4f} {t['images_per_s']:.0f} img/s, "
             f"{t['samples_skipped']} skipped{val_text}")


def log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        tqdm.write(f"logitcache train: {msg}", file=sys.stderr)
