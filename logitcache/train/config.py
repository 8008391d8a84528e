"""`TrainConfig` (every setting a run depends on, validated on creation, JSON round trip), the optimizer, and the
learning rate as a pure function of progress (so a resumed run follows the same schedule)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from logitcache.losses import get_loss, parse_loss_args
from logitcache.replay import DEFAULT_STREAMS, check_workers
from logitcache.runtime.precision import check_teacher_precision, default_teacher_precision

OPTIMIZERS = ("sgd", "adamw")


SCHEDULES = ("cosine", "step")


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
    teacher_precision: str | None = None  # online KD: the teacher body's (None: bf16 on a GPU, fp32 elsewhere)
    seed: int = 0
    shards: tuple[int, ...] | None = None
    checkpoint_every: int = 0
    resume: bool = False
    compile: bool = False
    skip_bad: bool = False
    pskd_topk: int | None = None  # None: num_classes (dense, the reference exactly)
    shuffle_buffer: int = 1000
    progress: bool = True
    views_per_decode: int = 1  # each decoded image yields its views for this many consecutive epochs (a pass)
    streams: int = DEFAULT_STREAMS  # a rank's shards are read in this many streams; the data order depends on it

    def __post_init__(self):
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
        if self.streams < 1:
            raise ValueError(f"--streams must be >= 1, got {self.streams}")
        check_workers(self.workers, self.streams)
        if self.views_per_decode < 1 or self.epochs % self.views_per_decode:
            raise ValueError(f"--views-per-decode must be >= 1 and divide --epochs (a pass of N epochs decodes each "
                             f"image once), got {self.views_per_decode} for {self.epochs} epoch(s)")
        if self.views_per_decode > 1 and spec.name == "pskd":
            raise ValueError("--loss pskd learns from the previous epoch's predictions, which a pass of "
                             "--views-per-decode epochs has not made yet; use --views-per-decode 1")
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
        if self.teacher and self.teacher_precision is None:  # recorded resolved in config.json
            object.__setattr__(self, "teacher_precision", default_teacher_precision(self.device))
        if self.teacher_precision is not None:
            check_teacher_precision(self.teacher_precision)
            if not self.teacher:
                raise ValueError("--teacher-precision is the online teacher's (--teacher); a cache records the "
                                 "precision it was dumped at (logitcache info)")

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


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


