"""`logitcache probe`: how much of THIS teacher must a cache keep? Measured, so nobody has to guess k.

Runs the teacher over the first ``views`` epoch-0 views of the data (the views `dump` draws, through its own
`UnitViews` and `Teacher`: the shards in order, as the `prior` tail's calibration takes them), keeps the dense
logits, and for each k and each storage setting `dump` can write — format 1, format 2, format 2 + the `prior`
tail, format 2 + the `sampled:M` tail — writes the rows through the real cache writer and reader
(`logitcache.cache.fidelity`, the measurement behind the README's storage frontier) and reports the mean top-k
mass, KL(dense || cache), the relative errors of the KD (T = 4, when recorded), DKD and NKD gradients, and the
bytes per view. It then recommends the cheapest setting whose NKD-gradient error meets ``target_grad_error``
(within 2 % of the cheapest, the simplest: see `recommend`).

Choices (README "logitcache probe"):
  * bytes per view = the stored chunk bytes per view + one unit marker per shard-length of views (what a dump of
    the data would store per view); the `prior` tail's once-per-group matrix is reported separately and, to rank
    the settings, spread over one epoch of the selected shards (conservative: more epochs make it cheaper);
  * the `prior` tail is cross-fitted: the views are split in two halves (alternate views) and each half is
    written with the class prior of the other, so the prior is never scored on the views it came from (a dump
    estimates it from ``--prior-views``, 20 per class by default: far more than a probe sees, so with few views
    the probe's prior figure is pessimistic);
  * the gradients are taken w.r.t. a weaker student made from the teacher (`fidelity.weaker_student`);
  * the `sampled` tail's errors are those of one draw (it is unbiased over draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from logitcache.cache import fidelity
from logitcache.data.manifest import load_manifest
from logitcache.dump import UnitViews, shards_covering
from logitcache.errors import LogitcacheError
from logitcache.labels.codecs import DEFAULT_CODEC
from logitcache.labels.tails import parse_tail
from logitcache.labels.topk import _normalise_temperatures
from logitcache.runtime.precision import check_teacher_precision
from logitcache.teacher import Teacher
from logitcache.views.recipe import resolve_recipe

DEFAULT_KS = (1, 5, 10, 20)
#: the dense logits the probe keeps (views x classes, float32, with float64 copies while measuring): bounded
MAX_DENSE_VALUES = 50_000_000


class ProbeError(LogitcacheError, ValueError):
    """A probe that cannot run as asked (bad --views, --ks, --target-grad-error, a data set too small, ...)."""


@dataclass(frozen=True)
class ProbeConfig:
    data: str
    teacher: str
    weights: str | None = None
    recipe: str | None = None
    image_size: int | None = None
    shards: tuple[int, ...] | None = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    teacher_precision: str | None = None
    views: int = 512
    ks: tuple[int, ...] = DEFAULT_KS
    temperatures: tuple[float, ...] = (1.0, 4.0)
    target_grad_error: float = 0.02
    tail_samples: int = 8
    #: sampled tails: fresh tail draws whose mean gradient gives the error in expectation (0: one draw only)
    draws: int = 256
    #: the tail rules measured in format 2 (`--tail`, as `dump --tail` names them); format 1 is always the reference
    tails: tuple[str, ...] = ("uniform", "prior", "sampled")
    #: format 2's value codings measured with each tail (`--codecs`, as `dump --codec` names them)
    codecs: tuple[str, ...] = (DEFAULT_CODEC,)
    skip_bad: bool = False
    progress: bool = False
    settings: tuple[fidelity.Setting, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.views < 4:
            raise ProbeError(f"--views must be >= 4 (the prior tail is cross-fitted on two halves), got {self.views}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ProbeError(f"--ks must be positive integers, got {list(self.ks)}")
        if not (0 < self.target_grad_error < math.inf):
            raise ProbeError(f"--target-grad-error must be > 0, got {self.target_grad_error}")
        if self.batch_size < 1:
            raise ProbeError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tail_samples < 1:
            raise ProbeError(f"--tail-samples must be >= 1, got {self.tail_samples}")
        if self.draws == 1 or self.draws < 0:
            raise ProbeError(f"--draws must be 0 (one draw only) or >= 2, got {self.draws}")
        try:
            _normalise_temperatures(self.temperatures)
        except ValueError as e:
            raise ProbeError(f"--temperatures: {e}") from None
        if self.teacher_precision is not None:
            check_teacher_precision(self.teacher_precision)
        if not self.settings:
            try:
                format2 = [fidelity.format2(self._format2_setting(t), c) for c in self.codecs for t in self.tails]
            except ValueError as e:
                raise ProbeError(f"--codecs: {e}") from None
            object.__setattr__(self, "settings", (fidelity.FORMAT_1, *format2))

    def _format2_setting(self, spec: str) -> fidelity.Setting:
        """Format 2 with the tail rule ``spec`` (`labels.tails.parse_tail`'s names; bare ``sampled`` takes
        --tail-samples)."""
        try:
            name, m = parse_tail(spec)
        except ValueError as e:
            raise ProbeError(f"--tail: {e}") from None
        if name == "sampled":
            return fidelity.sampled(m if ":" in spec else self.tail_samples)
        return fidelity.FORMAT_2_PRIOR if name == "prior" else fidelity.FORMAT_2


@dataclass
class ProbeViews:
    logits: torch.Tensor  # (N, C) float32, dense
    target: torch.Tensor  # (N,)
    params: np.ndarray  # (N, P) int16
    fields: tuple[str, ...]
    recipe: dict
    epoch_views: int  # views in one epoch of the selected shards
    mean_shard_length: float
    shards: tuple[int, ...]


def collect_views(cfg: ProbeConfig) -> ProbeViews:
    """The teacher's dense logits on the first ``cfg.views`` epoch-0 views (shard order, offset order) of the
    selected shards: the same views whatever the number of workers (each shard's batches come in offset order;
    the run stops once the prefix of shards in order covers the views)."""
    manifest = load_manifest(cfg.data)
    shards = list(cfg.shards) if cfg.shards is not None else list(range(len(manifest.shards)))
    bad = [s for s in shards if not 0 <= s < len(manifest.shards)]
    if bad:
        raise ProbeError(f"--shards {bad} not in {cfg.data} (it has {len(manifest.shards)} shards)")
    if cfg.views * manifest.num_classes > MAX_DENSE_VALUES:
        raise ProbeError(f"--views {cfg.views} x {manifest.num_classes} classes of {cfg.data} is more dense "
                         f"logits than the probe keeps ({MAX_DENSE_VALUES:,}): use --views <= "
                         f"{MAX_DENSE_VALUES // manifest.num_classes}")
    recipe = resolve_recipe(cfg.recipe, cfg.image_size, default=manifest.default_recipe,
                            default_where=f"the manifest of {cfg.data}")
    teacher = Teacher.load(cfg.teacher, cfg.weights, manifest.num_classes, recipe.image_size, cfg.device, cfg.seed,
                           precision=cfg.teacher_precision)
    use = shards_covering(manifest, shards, cfg.views)
    views = UnitViews(manifest, {s: [0] for s in use}, recipe, cfg.seed, cfg.batch_size, cfg.skip_bad)
    loader = torch.utils.data.DataLoader(views, batch_size=None, num_workers=cfg.workers, collate_fn=lambda b: b)
    got: dict[int, list] = {s: [] for s in use}
    ended: set[int] = set()
    with torch.inference_mode():
        for batch in loader:
            if len(batch.offsets):
                got[batch.shard].append((batch.offsets, teacher.logits(batch.images).cpu(), batch.labels,
                                         batch.view_params))
            if batch.end_of_unit:
                ended.add(batch.shard)
            if _covered(use, got, ended, cfg.views):
                break
    parts = [p for s in use for p in got[s]]
    if not parts:
        raise ProbeError(f"no views: the selected shards of {cfg.data} hold no readable samples")
    logits, target, params = (torch.cat([p[i] for p in parts])[:cfg.views] for i in (1, 2, 3))
    selected = [manifest.shards[s].num_samples for s in shards]
    return ProbeViews(logits.float(), target.long(), params.numpy().astype(np.int16), tuple(recipe.param_fields),
                      recipe.to_json(), sum(selected), sum(selected) / len(selected), tuple(use))


def _covered(shards: list[int], got: dict[int, list], ended: set[int], n: int) -> bool:
    """True once the first ``n`` views in (shard, offset) order have all arrived."""
    need = n
    for s in shards:
        have = sum(len(p[0]) for p in got[s])
        if have >= need:
            return True
        if s not in ended:
            return False
        need -= have
    return True  # every shard ended: all there is


def probe(cfg: ProbeConfig) -> dict[str, Any]:
    """The probe's report (see the module docstring): ``rows`` per (k, setting) and a ``recommendation``."""
    pv = collect_views(cfg)
    n, c = pv.logits.shape
    if n < 4:
        raise ProbeError(f"only {n} view(s) in the selected shards of {cfg.data}: the probe needs at least 4")
    temps = _normalise_temperatures(cfg.temperatures)
    ks = sorted({min(k, c) for k in cfg.ks})
    student = fidelity.weaker_student(pv.logits, cfg.seed)
    halves = [np.arange(0, n, 2), np.arange(1, n, 2)]
    unit = max(1, min(int(pv.mean_shard_length), n // 2))  # the same unit size for every setting
    p = pv.logits.double().softmax(1)
    report: dict[str, Any] = {
        "teacher": cfg.teacher, "weights": cfg.weights, "data": cfg.data, "views": n, "num_classes": c,
        "shards_probed": list(pv.shards), "recipe": pv.recipe, "temperatures": list(temps),
        "teacher_top1": float((p.argmax(1) == pv.target).double().mean()),
        "mean_top1_prob": float(p.max(1).values.mean()),
        "mean_topk_mass": {str(k): float(p.topk(k, 1).values.sum(1).mean()) for k in ks},
        "target_grad_error": cfg.target_grad_error, "epoch_views": pv.epoch_views, "rows": [],
    }
    for k in ks:
        priors = None
        if any(s.tail == "prior" for s in cfg.settings):
            priors = [fidelity.class_prior(pv.logits[h], pv.target[h], k) for h in halves]
        for setting in cfg.settings:
            folds = [(halves[0], priors[1]), (halves[1], priors[0])] if setting.tail == "prior" else None
            row = fidelity.measure(setting, k, pv.logits, pv.target, student, pv.params, pv.fields, temps,
                                   folds=folds, shard_size=unit, teacher=_group_name(cfg.teacher), recipe=pv.recipe,
                                   draws=cfg.draws, draw_views=min(n, DRAW_VIEWS))
            row["dump_bytes_per_view"] = row["chunk_bytes_per_view"] + row["marker_bytes_per_unit"] / max(
                pv.mean_shard_length, 1.0)
            row["ranked_bytes_per_view"] = row["dump_bytes_per_view"] + row["prior_bytes"] / pv.epoch_views
            row["mean_topk_mass"] = report["mean_topk_mass"][str(k)]
            row["dump_flags"] = _flags(setting, k, temps)
            report["rows"].append(row)
    report.update(recommend(report["rows"], cfg.target_grad_error))
    report["in_expectation"] = recommend_in_expectation(report["rows"], cfg.target_grad_error, report["recommendation"])
    return report


#: views on which a sampled tail's expected gradient is measured (R draws of each)
DRAW_VIEWS = 500


#: within this fraction of the cheapest setting meeting the target, the simpler one is recommended
NEAR_TIE = 0.02


def _complexity(r: dict) -> int:
    """Simpler first: format 2 uniform (nothing extra), prior (a calibration pass), sampled (draws), format 1;
    within each, the default codec before a `--codec` one."""
    if r["format"] == 1:
        return 6
    tail = {"uniform": 0, "prior": 1}.get(r["tail"].partition(":")[0], 2)
    return 2 * tail + (r.get("codec", DEFAULT_CODEC) != DEFAULT_CODEC)


def recommend(rows: list[dict], target: float, key: str = "grad_relerr_nkd_T1") -> dict[str, Any]:
    """The cheapest row (ranked bytes per view) whose ``key`` error is <= ``target`` — where others meeting it
    cost within `NEAR_TIE` of it, the simplest of them (`_complexity`), then the smallest k. When none meets it,
    ``recommendation`` is None and ``closest`` the row with the smallest error (then the cheapest)."""
    ok = [r for r in rows if r[key] <= target]
    if ok:
        cheapest = min(r["ranked_bytes_per_view"] for r in ok)
        near = [r for r in ok if r["ranked_bytes_per_view"] <= cheapest * (1 + NEAR_TIE)]
        best = min(near, key=lambda r: (_complexity(r), r["k"], r["ranked_bytes_per_view"]))
        return {"recommendation": _brief(best), "closest": None}
    closest = min(rows, key=lambda r: (r[key], r["ranked_bytes_per_view"]))
    return {"recommendation": None, "closest": _brief(closest)}


def recommend_in_expectation(rows: list[dict], target: float, recommendation: dict | None,
                             key: str = "expected_relerr_nkd_T1") -> dict[str, Any] | None:
    """The cheapest `sampled` row whose NKD-gradient error *in expectation* (the mean gradient over fresh tail
    draws: what SGD averages, each cached view carrying its own draw) is <= ``target``, when it is cheaper than
    the `recommend` pick or there is none; else None. One draw of it is noisier (``grad_relerr_nkd_T1``), which
    is why it is offered next to the recommendation, not as it."""
    ok = [r for r in rows if key in r and r[key] <= target]
    if not ok:
        return None
    best = min(ok, key=lambda r: (r["ranked_bytes_per_view"], r["k"]))
    if recommendation is not None and recommendation["ranked_bytes_per_view"] <= best["ranked_bytes_per_view"]:
        return None
    return {**_brief(best), **{k: best[k] for k in (key, "mc_floor_nkd_T1", "draws", "draw_views")}}


def _brief(r: dict) -> dict[str, Any]:
    return {key: r[key] for key in ("k", "setting", "dump_flags", "dump_bytes_per_view", "ranked_bytes_per_view",
                                    "prior_bytes", "grad_relerr_nkd_T1", "kl_T1")}


def _flags(setting: fidelity.Setting, k: int, temps: tuple[float, ...]) -> str:
    parts = [f"--topk {k}"]
    if temps != (1.0,):
        parts.append("--temperatures " + ",".join(f"{t:g}" for t in temps))
    if setting.dump_flags:
        parts.append(setting.dump_flags)
    return " ".join(parts)


def _group_name(teacher: str) -> str:
    return teacher.replace("/", "_").replace(":", "_")
