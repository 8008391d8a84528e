"""Stage 2: train a student — from a cache, online with a teacher, or teacher-free — in one loop.

    views   CachedViews (the cache's views, replayed) | FreshViews (sample_view(view_rng(seed, e, i)))
    soft    exactly one source per mode:  --cache   the cache's TopKLogits rows
                                          --teacher the teacher on the same batch (no grad)
                                          neither   none (ce, ls, tf-kd, zipf-ls, tf-nkd, uskd), or PS-KD's
                                                    previous-epoch predictions (pskd_store)
    loss    terms = spec.terms(student, target, teacher=soft, weak=..., prev_probs=...);  loss = Σ terms

Determinism: the data order is a pure function of (seed, epoch, rank count, worker count) (`replay`), the model
is initialised from ``torch.manual_seed(seed)``, and the learning rate is a pure function of the progress, so
``--resume`` from a checkpoint (taken at an epoch's end, or every ``--checkpoint-every`` steps; a mid-epoch
resume skips the batches already trained) reaches the same weights as an uninterrupted run on the CPU.

DDP (torchrun; gloo on CPU, NCCL on GPU): ranks read disjoint whole shards, so they may hold different sample
counts. The ranks stay in lockstep: before each step they agree (one small all-reduce) on the number of samples
in this step over all ranks; a rank that has run out repeats its last batch with weight 0 (batch-norm statistics
frozen), so every rank runs the same optimizer steps, with the same learning rate, momentum and weights, and the
gradient is the exact mean over the samples of the global batch (each rank's loss is weighted by
``n_rank · world / n_all``). After each epoch the ranks compare a checksum of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from logitcache.atomic import write_atomic

#: tests only: SIGKILL the run right before its N+1-th optimizer step (a real kill at a reproducible point)
KILL_AFTER_STEPS_ENV = "LOGITCACHE_TEST_KILL_AFTER_STEPS"

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
#: config fields that may change between a run and its --resume without changing what the run computes
#: (epochs may grow; workers/device change the order/numerics, so the run says so)
#: steps between progress-bar updates (each one syncs with the device once)
LOG_EVERY = 10
RESUMABLE_CHANGES = ("resume", "progress", "checkpoint_every", "epochs", "workers", "device", "compile")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated on creation, JSON round-trip (`to_json`/`from_json`)."""

    data: str
    out: str
    student: str
    loss: str = "ce"
    val: str | None = None
    init: str | None = None
    loss_args: tuple[str, ...] = ()  # "KEY=VALUE" as given to --loss-arg
    ce_weight: float | None = None  # None: the method's paper setting
    loss_weight: float | None = None
    cache: str | None = None
    group: str | None = None
    teacher: str | None = None
    weights: str | None = None
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    step_milestones: tuple[float, ...] | None = None  # epochs; None: half and three quarters of --epochs
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    recipe: str | None = None  # None: the cache's recipe with --cache, else "imagenet"
    image_size: int | None = None
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    shards: tuple[int, ...] | None = None
    checkpoint_every: int = 0
    resume: bool = False
    compile: bool = False
    skip_bad: bool = False
    pskd_topk: int | None = None  # None: num_classes (dense, the reference exactly)
    shuffle_buffer: int = 1000
    progress: bool = True

    def __post_init__(self):
        from logitcache.losses import get_loss, parse_loss_args

        for name in ("loss_args", "shards", "step_milestones"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        spec = get_loss(self.loss)
        object.__setattr__(self, "loss", spec.name)
        parse_loss_args(spec.name, self.loss_args)  # unknown keys / bad values raise here
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup-epochs must be in [0, --epochs={self.epochs}), got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.momentum < 0 or not 0 < self.step_gamma <= 1:
            raise ValueError("--weight-decay and --momentum must be >= 0 and --step-gamma in (0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing > 0 and spec.replaces_ce:
            raise ValueError(f"--label-smoothing smooths the CE term, which loss '{spec.name}' replaces")
        if self.workers < 0 or self.checkpoint_every < 0 or self.shuffle_buffer < 0:
            raise ValueError("--workers, --checkpoint-every and the shuffle buffer must be >= 0")
        if self.pskd_topk is not None and (self.pskd_topk < 1 or spec.name != "pskd"):
            raise ValueError("pskd_topk applies to --loss pskd and must be >= 1")
        # where the soft labels come from: one source, and the one the loss needs
        needs_teacher = "teacher" in spec.needs
        if self.cache and self.teacher:
            raise ValueError("give --cache or --teacher, not both: the soft labels come from exactly one place")
        if needs_teacher and not (self.cache or self.teacher):
            raise ValueError(f"loss '{spec.name}' distils a teacher: give --cache CACHE, or --teacher NAME "
                             f"--weights W to run it online")
        if not needs_teacher and (self.cache or self.teacher):
            extra = "--cache" if self.cache else "--teacher"
            raise ValueError(f"loss '{spec.name}' is teacher-free and would ignore {extra}; drop it, or choose a "
                             f"distillation loss (kd, dkd, nkd)")
        if self.group and not self.cache:
            raise ValueError("--group selects a teacher group inside --cache; there is no --cache")
        if self.weights and not self.teacher:
            raise ValueError("--weights are the teacher's; there is no --teacher (the student's are --init)")
        if self.cache and self.recipe is None and self.image_size is not None:
            raise ValueError("--image-size without --recipe: with --cache the recipe (and size) is the cache's; "
                             "give both to check them against it")

    # ---------------------------------------------------------------- derived
    @property
    def mode(self) -> str:
        """"cache", "online" or "teacher-free"."""
        return "cache" if self.cache else "online" if self.teacher else "teacher-free"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**d)


# ------------------------------------------------------------------ the learning rate (a pure function)
def learning_rate(cfg: TrainConfig, t: float, dt: float) -> float:
    """The learning rate of the step that starts at progress ``t`` epochs (``dt`` = one step, in epochs).

    Linear warm-up over ``warmup_epochs`` (reaching ``lr`` at its end), then cosine decay to 0 at ``epochs``,
    or ×``step_gamma`` at each of ``step_milestones`` (default: half and three quarters of ``epochs``)."""
    w = cfg.warmup_epochs
    if w > 0 and t < w:
        return cfg.lr * min(1.0, (t + dt) / w)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (cfg.epochs - w)))
    milestones = cfg.step_milestones if cfg.step_milestones is not None else (cfg.epochs * 0.5, cfg.epochs * 0.75)
    return cfg.lr * cfg.step_gamma ** sum(t >= m for m in milestones)


def planned_steps(manifest, shards, seed: int, epoch: int, world: int, batch_size: int, workers: int) -> int:
    """Steps of an epoch when nothing is skipped: the most batches any rank's DataLoader yields (lockstep)."""
    from logitcache.shards import ShardDataset, split_shards

    order = ShardDataset(manifest, shards, rank=0, world_size=world, shuffle_seed=seed, epoch=epoch).shard_order()
    nw = max(workers, 1)
    return max(
        sum(math.ceil(sum(manifest.shards[s].num_samples for s in split_shards(order, r, world, w, nw)) / batch_size)
            for w in range(nw))
        for r in range(world)
    )


# ------------------------------------------------------------------ the run directory
class RunDir:
    """RUN/config.json, RUN/metrics.jsonl, RUN/val_reliability.json, RUN/checkpoints/ (local paths)."""

    def __init__(self, out: str):
        if "://" in out and not out.startswith("file://"):
            raise ValueError(f"--out {out!r}: run directories are local paths (checkpoints are written atomically "
                             f"with a rename); copy the run to object storage afterwards")
        self.path = out[len("file://"):] if out.startswith("file://") else out
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.last = os.path.join(self.checkpoints, "last.pt")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(self.file(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_atomic(name, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, name: str) -> Any:
        with open(self.file(name)) as f:
            return json.load(f)

    def metrics(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.file("metrics.jsonl")):
            return []
        with open(self.file("metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def keep_metrics_before(self, epoch: int) -> None:
        """Drop metrics lines of epochs a resumed run will redo (written after the checkpoint it resumes)."""
        lines = [m for m in self.metrics() if m["epoch"] < epoch]
        self.write_atomic("metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines).encode())

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, state: dict[str, Any], *names: str) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        for name in names:
            self.write_atomic(os.path.join("checkpoints", name), buffer.getvalue())


# ------------------------------------------------------------------ small pieces of the loop
def _distributed(device: str) -> tuple[int, int, str, bool]:
    """(rank, world, device, whether we created the process group) under torchrun; (0, 1, device, False) else."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    created = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        created = True
    if device == "cuda":  # one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), world, device, created


def _all_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def _frozen_bn(model: torch.nn.Module, frozen: bool):
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


def _weights_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.state_dict().values() if p.is_floating_point()))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"logitcache train: {msg}", file=sys.stderr)


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _config_diff(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    now = cfg.to_json()
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, *, argv: list[str] | None = None, stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the last metrics line. ``stop_after_epochs``: end this process after that
    many epochs (checkpointed), e.g. for time-limited jobs; ``resume=True`` continues."""
    from tqdm import tqdm

    from logitcache.cache import CacheReader
    from logitcache.dump import load_teacher, teacher_logits
    from logitcache.errors import LogitcacheError, TemperatureNotRecorded
    from logitcache.evaluate import evaluate
    from logitcache.losses import get_loss, parse_loss_args
    from logitcache.losses.label_smoothing import label_smoothing
    from logitcache.manifest import load_manifest
    from logitcache.models import attach_weak_head, build_model, load_checkpoint, model_normalization
    from logitcache.provenance import provenance, utc_now
    from logitcache.pskd_store import STORE_NAME, PredictionStore
    from logitcache.replay import CachedViews, CycledViewsWarning, FreshViews, check_cache_matches, collate
    from logitcache.views import get_recipe

    rank, world, device, own_group = _distributed(cfg.device)
    cuda = device.startswith("cuda")
    run = RunDir(cfg.out)
    spec, loss_args = get_loss(cfg.loss), parse_loss_args(cfg.loss, cfg.loss_args)
    ce_weight = spec.ce_weight if cfg.ce_weight is None else cfg.ce_weight
    manifest = load_manifest(cfg.data)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    if len(shards) < world:
        raise LogitcacheError(f"{len(shards)} shard(s) cannot feed {world} ranks (ranks read whole shards): "
                              f"use at most {len(shards)} processes, or data with more shards")
    num_classes = manifest.num_classes
    val_manifest = load_manifest(cfg.val) if cfg.val else None
    notes: list[str] = []

    # ---- where the soft labels come from (exactly one of: the cache, a teacher, nothing)
    cache = teacher = None
    if cfg.cache:
        cache = CacheReader(cfg.cache, cfg.group)
        requested = get_recipe(cfg.recipe, cfg.image_size) if cfg.recipe else None
        recipe = check_cache_matches(cache, manifest, requested)
        missing = [t for t in spec.teacher_temperatures(loss_args)
                   if not any(math.isclose(t, u, rel_tol=1e-6) for u in cache.meta.temperatures)]
        if missing:
            raise TemperatureNotRecorded(
                f"loss '{spec.name}' reads the teacher at temperature(s) {missing}, which cache {cfg.cache} group "
                f"'{cache.group}' did not record (it has {list(cache.meta.temperatures)}); re-dump with "
                f"--temperatures including them")
        if cfg.epochs > cache.meta.epochs:
            notes.append(f"the cache holds {cache.meta.epochs} epoch(s) of views; training for {cfg.epochs} epochs "
                         f"replays them cyclically (epoch e uses cached epoch e mod {cache.meta.epochs})")
    else:
        recipe = get_recipe(cfg.recipe or "imagenet", cfg.image_size)
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, cfg.weights, num_classes, recipe.image_size, device, cfg.seed)
        t_mean, t_std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in model_normalization(cfg.teacher))
        if cfg.weights is None:
            notes.append(f"teacher {cfg.teacher} has no --weights: randomly initialised from seed {cfg.seed}")
    if "votes" in spec.needs:
        notes.append("zipf-ls ranks classes by the student's own logits (votes=None): the models here do not expose "
                     "per-pixel votes of their last feature map")

    # ---- the student (and USKD's weak head), the optimizer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.student, num_classes, weights=cfg.init, image_size=recipe.image_size)
    if "weak" in spec.needs:
        model = attach_weak_head(model, cfg.student, num_classes, image_size=recipe.image_size)
    model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in model_normalization(cfg.student))
    optimizer = make_optimizer(cfg, model)
    store = None

    # ---- resume
    start_epoch, batches_done, step, rank_state = 0, 0, 0, None
    resume_obj = None
    if cfg.resume and os.path.exists(run.last):
        resume_obj = load_checkpoint(run.last)
    elif os.path.exists(run.last):
        raise LogitcacheError(f"{cfg.out} already holds a run ({run.last}); pass --resume to continue it, or "
                              f"choose another --out")
    elif cfg.resume:
        _log(rank, f"--resume: no checkpoint in {run.checkpoints}; starting from scratch")
    if resume_obj is not None:
        saved = json.loads(resume_obj["config"])
        diff = [d for d in _config_diff(saved, cfg) if d.split(":")[0] not in RESUMABLE_CHANGES]
        if diff:
            raise LogitcacheError(f"{run.last} was made with another configuration; refusing to resume:\n  "
                                  + "\n  ".join(diff))
        model.load_state_dict(resume_obj["model"])
        optimizer.load_state_dict(resume_obj["optimizer"])
        step = int(resume_obj["step"])
        start_epoch, batches_done = int(resume_obj["epoch"]), int(resume_obj["batches_done"])
        if resume_obj["epoch_complete"]:
            start_epoch, batches_done = start_epoch + 1, 0
        elif int(resume_obj["world_size"]) != world or saved.get("workers") != cfg.workers:
            raise LogitcacheError(f"{run.last} was taken mid-epoch with {resume_obj['world_size']} rank(s) and "
                                  f"{saved.get('workers')} worker(s); resume it with the same counts (the data "
                                  f"order depends on them)")
        else:
            rank_state = resume_obj["ranks"][rank]
        torch.set_rng_state(resume_obj["rng"]["torch"])
        if cuda and "cuda" in resume_obj["rng"]:
            torch.cuda.set_rng_state(resume_obj["rng"]["cuda"], torch.device(device))
        _log(rank, f"resuming {run.last}: epoch {start_epoch}, {batches_done} batch(es) done, step {step}")
    if spec.name == "pskd":
        store = PredictionStore.create(
            run.file(STORE_NAME), manifest, k=cfg.pskd_topk or num_classes, recipe=recipe, seed=cfg.seed,
            student=cfg.student, normalization={"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
            rank=rank, world=world, fresh=resume_obj is None)
        if rank_state is not None:
            store.load_state_dict(rank_state["pskd"])

    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    if cfg.compile:
        model = torch.compile(model)
    for note in notes:
        _log(rank, note)

    # ---- the run directory: config.json (with provenance), metrics.jsonl
    prov = provenance(argv)
    if rank == 0:
        os.makedirs(run.checkpoints, exist_ok=True)
        config = run.read_json("config.json") if resume_obj is not None and os.path.exists(
            run.file("config.json")) else {}
        config.update(cfg.to_json())
        config["resolved"] = {
            "mode": cfg.mode, "loss_args": loss_args, "ce_weight": ce_weight,
            "loss_weight": spec.loss_weight if cfg.loss_weight is None else cfg.loss_weight,
            "recipe": recipe.to_json(), "num_classes": num_classes, "world_size": world, "device": device,
            "student_parameters": sum(p.numel() for p in raw_model.parameters()),
            "normalization": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()},
            "cache": None if cache is None else {
                "url": cfg.cache, "group": cache.group, "teacher": cache.meta.teacher, "weights": cache.meta.weights,
                "weights_digest": cache.meta.weights_digest, "epochs": cache.meta.epochs, "k": cache.meta.k,
                "temperatures": list(cache.meta.temperatures), "seed": cache.meta.seed},
            "zipf_votes": "logits" if "votes" in spec.needs else None,
            "notes": notes,
        }
        config["provenance"] = [*config.get("provenance", []), {
            **prov, "resumed_from": None if resume_obj is None else {"epoch": start_epoch, "batches": batches_done}}]
        run.write_json("config.json", config)
        run.keep_metrics_before(start_epoch)

    kill_after = int(os.environ.get(KILL_AFTER_STEPS_ENV, "0"))
    last_line: dict[str, Any] = {}
    last_batch = None
    total_samples = sum(manifest.shards[s].num_samples for s in shards)
    for epoch in range(start_epoch, cfg.epochs):
        # ---- this epoch's data: the views, and the soft labels that travel with them
        common = dict(epoch=epoch, shards=shards, rank=rank, world_size=world, skip_bad=cfg.skip_bad,
                      shuffle_seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, return_items=True)
        if cache is not None:
            with warnings.catch_warnings():  # the run says so itself, once, in its log and config.json
                warnings.simplefilter("ignore", CycledViewsWarning)
                dataset = CachedViews(manifest, cache, recipe=recipe, **common)
        else:
            rows = store.source(epoch) if store is not None else None
            dataset = FreshViews(manifest, seed=cfg.seed, recipe=recipe, rows=rows, **common)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate, pin_memory=cuda,
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),  # leaves the global RNG alone
        )
        n_steps = planned_steps(manifest, shards, cfg.seed, epoch, world, cfg.batch_size, cfg.workers)
        # running sums (float64, on the device: no host sync per step): samples, correct, Σ term·n, seconds
        acc: dict[str, torch.Tensor] = {}
        seconds = 0.0
        if rank_state is not None:
            acc = {k: v.to(device) for k, v in rank_state["acc"].items() if k != "seconds"}
            seconds = float(rank_state["acc"].get("seconds", 0.0))
        rank_state = None
        raw_model.train()
        bar = tqdm(total=n_steps, initial=batches_done, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                   disable=not cfg.progress or rank != 0, leave=False)
        batches = iter(loader)
        for _ in range(batches_done):  # a mid-epoch resume: these batches were trained before the checkpoint
            skipped_batch = next(batches, None)
            last_batch = skipped_batch if skipped_batch is not None else last_batch
        i, t0 = batches_done, time.perf_counter()
        lr = learning_rate(cfg, epoch + i / n_steps, 1.0 / n_steps)
        while True:
            if kill_after and step >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            batch = next(batches, None)
            n = 0 if batch is None else len(batch.target)
            n_all, active = _all_sum([float(n), float(batch is not None)], world)
            if active == 0:
                break
            repeat = batch is None  # this rank ran out of shards: keep in lockstep with weight 0
            if repeat:
                if last_batch is None:
                    raise LogitcacheError(f"rank {rank} has no samples to keep in lockstep with (all skipped?)")
                batch = last_batch
            last_batch = batch
            lr = learning_rate(cfg, epoch + i / n_steps, 1.0 / n_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # forward: the student on the view, the soft labels from this mode's one source
            images, target = batch.image.to(device, non_blocking=True), batch.target.to(device, non_blocking=True)
            x = images.float().div_(255).sub_(mean).div_(std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
            with _frozen_bn(raw_model, repeat), amp:
                out = model(x)
            logits, weak = (out[0].float(), out[1].float()) if isinstance(out, tuple) else (out.float(), None)
            soft, prev_probs = None, None
            if cache is not None:
                soft = batch.soft.to(device)  # the cache's TopKLogits rows for exactly these views
            elif teacher is not None:
                with torch.no_grad():
                    soft = teacher_logits(teacher, batch.image, t_mean, t_std, device)  # online, same views
            elif store is not None and batch.soft is not None:
                prev_probs = batch.soft.to(device).probs(1.0)  # PS-KD: last epoch's own predictions
            terms = spec.terms(logits, target, args=loss_args, teacher=soft, weak=weak, prev_probs=prev_probs,
                               votes=None, epoch=epoch, epochs=cfg.epochs, ce_weight=cfg.ce_weight,
                               loss_weight=cfg.loss_weight)
            if cfg.label_smoothing > 0 and "ce" in terms:
                terms["ce"] = ce_weight * label_smoothing(logits, target, epsilon=cfg.label_smoothing)
            loss = sum(terms.values())

            # backward: each rank's mean weighted by its share of the global batch (0 for a lockstep repeat)
            optimizer.zero_grad(set_to_none=True)
            (loss * (n * world / n_all)).backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
            optimizer.step()
            step, i = step + 1, i + 1

            if not repeat:
                zero = torch.zeros((), dtype=torch.float64, device=device)
                for k, v in terms.items():
                    acc[k] = acc.get(k, zero) + v.detach().double() * n
                acc["n"] = acc.get("n", zero) + n
                acc["correct"] = acc.get("correct", zero) + (logits.detach().argmax(1) == target).sum()
                if store is not None:
                    store.record(epoch, batch.index, logits, batch.target, batch.view)
            bar.update(1)
            if i % LOG_EVERY == 0 or cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                if not math.isfinite(float(loss.detach())):
                    raise LogitcacheError(f"non-finite loss at epoch {epoch} step {step}: "
                                          f"{ {k: float(v.detach()) for k, v in terms.items()} }")
                elapsed = seconds + time.perf_counter() - t0
                seen = float(acc["n"]) if "n" in acc else 0.0
                bar.set_postfix({**{k: f"{float(v.detach()):.4f}" for k, v in terms.items()}, "lr": f"{lr:.3g}",
                                 "img/s": f"{seen * world / max(elapsed, 1e-9):.0f}"}, refresh=False)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save(run, cfg, world, raw_model, optimizer, store, epoch, i, step, device,
                      {**acc, "seconds": seconds + time.perf_counter() - t0}, complete=False)
        bar.close()
        seconds += time.perf_counter() - t0
        batches_done = 0
        if store is not None:
            store.finish_epoch(epoch)
            if world > 1:
                torch.distributed.barrier()  # next epoch's readers may read units another rank wrote

        # ---- epoch summary: train figures summed over ranks, validation, metrics line, checkpoint
        term_names = sorted(k for k in acc if k not in ("n", "correct"))
        sums = _all_sum([float(acc.get(k, 0.0)) for k in ("n", "correct", *term_names)], world)
        seen = sums[0]
        train_stats = {k: sums[2 + j] / max(seen, 1) for j, k in enumerate(term_names)}
        train_stats.update({
            "loss": sum(train_stats.values()), "top1": sums[1] / max(seen, 1), "samples": int(seen),
            "samples_skipped": int(total_samples - seen), "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan"),
        })
        if world > 1:  # DDP syncs buffers at each forward's start; after the last, batch-norm stats are rank 0's
            for buffer in raw_model.buffers():
                torch.distributed.broadcast(buffer, 0)
        val_stats, bins = None, None
        if val_manifest is not None:
            val_stats, bins = evaluate(raw_model, val_manifest, recipe, batch_size=cfg.batch_size,
                                       workers=cfg.workers, device=device, skip_bad=cfg.skip_bad,
                                       normalization=(mean.flatten().tolist(), std.flatten().tolist()))
        if world > 1:
            sums = torch.tensor([_weights_checksum(raw_model)], dtype=torch.float64)
            gathered = [torch.zeros_like(sums) for _ in range(world)]
            torch.distributed.all_gather(gathered, sums)
            if len({float(g) for g in gathered}) != 1:
                raise LogitcacheError(f"ranks hold different weights after epoch {epoch}: "
                                      f"{[float(g) for g in gathered]}")
        last_line = {"epoch": epoch, "step": step, "lr": lr, "train": train_stats, "val": val_stats,
                     "cache_epoch": cache.cached_epoch(epoch) if cache is not None else None}
        if rank == 0:
            run.append_metrics(last_line)
            if bins is not None:
                run.write_json("val_reliability.json", bins.to_dict())
            val_text = "" if val_stats is None else (f"; val top1 {val_stats['top1']:.4f} nll {val_stats['nll']:.4f} "
                                                     f"ece {val_stats['ece']:.4f} (n={val_stats['n']})")
            _log(rank, f"epoch {epoch}: loss {train_stats['loss']:.4f} top1 {train_stats['top1']:.4f} "
                       f"{train_stats['images_per_s']:.0f} img/s, {train_stats['samples_skipped']} skipped{val_text}")
        _save(run, cfg, world, raw_model, optimizer, store, epoch, 0, step, device, {}, complete=True)
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
            break

    if not last_line and run.metrics():  # a --resume of a finished run: nothing left to do
        _log(rank, f"all {cfg.epochs} epoch(s) are done already")
        last_line = run.metrics()[-1]
    if rank == 0:
        config = run.read_json("config.json")
        config["provenance"][-1]["end_time"] = utc_now()
        config["samples_skipped_per_epoch"] = {str(m["epoch"]): m["train"]["samples_skipped"] for m in run.metrics()}
        run.write_json("config.json", config)
    if own_group:
        torch.distributed.destroy_process_group()
    return last_line


def _save(run, cfg, world, model, optimizer, store, epoch, batches_done, step, device, acc, *, complete) -> None:
    """Checkpoint (every rank calls this; rank 0 writes): everything as tensors and plain containers, the config
    as a JSON string, so it loads with ``torch.load(weights_only=True)``. Mid-epoch ones carry every rank's
    running sums and PS-KD rows awaiting their unit."""
    mine = {"acc": {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu() for k, v in acc.items()},
            "pskd": store.state_dict() if store is not None else {}}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"schedule": cfg.schedule, "step": step},  # the learning rate is a pure function of progress
        "epoch": epoch,
        "epoch_complete": complete,
        "batches_done": batches_done,
        "step": step,
        "world_size": world,
        "rng": _rng_state(device),
        "config": json.dumps(cfg.to_json(), sort_keys=True),
        "ranks": ranks if not complete else [],
    }
    names = ["last.pt"] + ([f"epoch-{epoch:04d}.pt"] if complete else [])
    run.save_checkpoint(state, *names)


__all__ = ["KILL_AFTER_STEPS_ENV", "RunDir", "TrainConfig", "learning_rate", "make_optimizer", "planned_steps",
           "train"]
