"""What a cache setting costs and how faithful it is, measured against the dense teacher logits it is made from.

The one measurement behind both `pipelines/bench_storage.py` (synthetic 1000-class teachers: the README's
storage frontier) and `logitcache probe` (the user's own teacher on views of the user's data). For a `Setting`
(format, codec, tail) and a k, `measure` writes the rows through the real `CacheWriter` into a temporary cache,
reads them back through `CacheReader` (so every byte and every rounding is the cache's own), and reports

  * bytes: the stored chunks, unit markers and metadata (logical sizes), the `prior` tail's once-per-group
    matrix separately, the allocated bytes (``st_blocks``: what `du` counts, directories included) and the stored
    objects per unit;
  * fidelity against the dense logits: KL(dense || cache) at T = 1 (mean per view, nats), and the relative error
    ``||g_cache - g_dense|| / ||g_dense||`` of the gradient w.r.t. the student logits of KD (T = 4, when 4 is
    recorded), DKD (alpha 1, beta 0.5, T = 1) and NKD (gamma 1.5, T = 1), over all rows at once. For `sampled`
    (random) that is the error of ONE draw (the cache's); with ``draws`` R > 0, `expected_gradient` also
    reports, on the first ``draw_views`` rows, the error of the MEAN gradient over R fresh draws (its bias: what
    SGD sees when each view's draw is independent), the RMS one-draw error on those rows, and the Monte-Carlo
    floor of the mean (its standard error, ~ one-draw noise / sqrt(R)). Deterministic tails need none of it:
    their expected error is the one-draw error.

Rows can be measured in *folds*, each written to its own cache with its own class prior: `logitcache probe`
cross-fits the `prior` tail (the prior of each half of the views comes from the other half), so the prior is
never evaluated on the views it was estimated from. Gradient errors over folds are those of the whole batch
(every loss is a mean of per-row terms, so fold gradients are summed with their row counts as weights).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.packs import finish_units
from logitcache.cache.reader import CacheReader
from logitcache.cache.writer import CacheWriter
from logitcache.labels.codecs import DEFAULT_CODEC, PackedCodec, codec_name, codec_settings, decode_unit, encode_topk
from logitcache.labels.tails import (
    PriorAccumulator,
    PriorTail,
    TailRule,
    parse_tail,
    tail_from_settings,
    tail_settings,
)
from logitcache.labels.topk import TopKLogits
from logitcache.losses import dkd, kd, nkd

#: the losses whose gradients are compared, with the hyper-parameters the README's figures use
GRADIENTS = ("kd_T4", "dkd_T1", "nkd_T1")


@dataclass(frozen=True)
class Setting:
    """A storage setting: cache format, format 2's codec parameters beyond the defaults, and the tail rule."""

    label: str
    format: int
    tail: str = "uniform"
    codec: dict = field(default_factory=dict)  # extra PackedCodec keywords (step_bits, knee, rest_bits)

    def __hash__(self) -> int:
        return hash(self.label)

    @property
    def dump_flags(self) -> str | None:
        """The `logitcache dump` flags that write this setting (None: a codec setting dump does not offer)."""
        if self.format == 1:
            return "--format 1"
        flags = [] if self.tail == "uniform" else [f"--tail {self.tail}"]
        if self.codec:
            flags.append(f"--codec {codec_name(**self.codec)}")
        return " ".join(flags)


FORMAT_1 = Setting("format 1 (fp16)", 1)
#: format 2's default before the lzma compressor (packed-q5, blosc), and its coding with lzma alone
FORMAT_2_Q5_BLOSC = Setting("format 2 q5-blosc", 2, codec={"step_bits": 5, "compressor": "blosc"})
FORMAT_2_Q5 = Setting("format 2 q5", 2, codec={"step_bits": 5})
FORMAT_2 = Setting("format 2", 2)
FORMAT_2_SMALL = Setting("format 2 small", 2, codec={"step_bits": 4, "knee": 4.0})
FORMAT_2_PRIOR = Setting("format 2 prior", 2, "prior")
#: the smallest setting at format 1's fidelity measured so far (README "Storage frontier"): the small codec, the
#: rest's log-odds at 2^-2 nats, and the prior tail
FORMAT_2_COMPACT_PRIOR = Setting("format 2 compact prior", 2, "prior",
                                 codec={"step_bits": 4, "knee": 4.0, "rest_bits": 2})


def sampled(m: int = 8) -> Setting:
    return Setting(f"format 2 sampled:{m}", 2, f"sampled:{m}")


def format2(tail: Setting, codec: str = DEFAULT_CODEC) -> Setting:
    """Format 2 setting ``tail`` (FORMAT_2, FORMAT_2_PRIOR, `sampled`) with `dump --codec` ``codec``."""
    if codec == DEFAULT_CODEC:
        return tail
    return Setting(f"{tail.label} {codec}", 2, tail.tail, codec_settings(codec))


#: the benchmark's frontier, in order of the README table
SETTINGS = (FORMAT_1, FORMAT_2_Q5_BLOSC, FORMAT_2_Q5, FORMAT_2, FORMAT_2_SMALL, FORMAT_2_PRIOR, FORMAT_2_COMPACT_PRIOR,
            sampled(2), sampled(3), sampled(4), sampled(8))


# ------------------------------------------------------------------ one cache per (setting, k, fold)
def write_cache(url: str, logits: torch.Tensor, target: torch.Tensor, views: np.ndarray, fields: tuple[str, ...],
                k: int, temps: tuple[float, ...], setting: Setting, prior: PriorTail | None, shard_size: int,
                *, teacher: str = "synthetic", recipe: dict | None = None) -> tuple[int, ...]:
    """Write ``logits`` (N, C) as a one-epoch cache of units of ``shard_size`` views; returns the unit lengths."""
    n, c = logits.shape
    lengths = tuple(min(shard_size, n - s) for s in range(0, n, shard_size))
    root = schema.RootMeta(teacher, c, len(lengths), lengths, format_version=(setting.format, 0))
    name, m = parse_tail(setting.tail)
    if name == "prior" and prior is None:
        raise ValueError("the prior tail needs a class prior")
    kw = {}
    if setting.format == 2:
        codec = PackedCodec(k, c, len(temps), len(fields), tail_samples=m, **setting.codec)
        kw = {"codec": codec.to_json(), "value_dtype": None, "index_dtype": None,
              "tail": tail_settings(setting.tail, prior_views=(prior.prior_views or 0) if prior else 0)}
    meta = schema.GroupMeta(
        teacher=teacher, weights=None, weights_digest="-", num_classes=c,
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3}, recipe=recipe or {"name": "imagenet"},
        param_fields=fields, k=k, temperatures=temps, seed=0, epochs=1, **kw,
    )
    use_prior = prior.prior if name == "prior" else None
    w = CacheWriter.create_or_open(url, teacher, meta, root, {}, prior=use_prior)
    rule = tail_from_settings(meta.tail, use_prior) if setting.format == 2 else None
    g = torch.Generator().manual_seed(0)  # the sampled tail's draws
    for s, length in enumerate(lengths):
        sl = slice(s * shard_size, s * shard_size + length)
        tk = TopKLogits.from_logits(logits[sl], target[sl], k, temps, keep_rest=setting.format == 2,
                                    **({"tail": rule, "generator": g} if rule is not None else {}))
        w.write_unit(0, s, np.arange(length), w.encode_rows(tk, views[sl]), length, {"views": length})
    finish_units(w.objects, w.group, w.meta)  # as `dump` ends
    return lengths


def read_back(url: str, target: torch.Tensor, lengths: tuple[int, ...]) -> tuple[TopKLogits, CacheReader]:
    r = CacheReader(url)
    parts, start = [], 0
    for s, length in enumerate(lengths):
        parts.append(r.topk_rows(r.read_unit(0, s), np.arange(length), target[start:start + length]))
        start += length
    return TopKLogits.cat(parts), r


def store_sizes(url: str, units: int) -> dict[str, float]:
    """Logical bytes by kind (chunks, prior, markers, metadata), allocated bytes (st_blocks, directories
    included) and objects, of a local cache directory; ``units_allocated`` / ``units_logical``: the same for the
    objects that grow with the data (unit chunks and their records: markers, unit indexes), without the cache's
    fixed metadata and folders — what allocated ÷ logical tends to at ImageNet scale."""
    out = {"chunks": 0, "prior": 0, "markers": 0, "metadata": 0, "allocated": 0, "objects": 0, "chunk_objects": 0,
           "marker_objects": 0, "units_allocated": 0, "units_logical": 0}
    for dirpath, _dirs, files in os.walk(url):
        out["allocated"] += os.stat(dirpath).st_blocks * 512
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out["allocated"] += st.st_blocks * 512
            out["objects"] += 1
            rel = os.path.relpath(p, url).split(os.sep)
            if len(rel) >= 3 and rel[1] in (schema.UNITS_DIR, schema.UNIT_INDEX_DIR):  # completion records
                out["markers"] += st.st_size
                out["marker_objects"] += rel[1] == schema.UNITS_DIR
            elif len(rel) >= 3 and rel[1] == schema.TAIL_PRIOR and rel[-1] != "zarr.json":
                out["prior"] += st.st_size
                continue
            elif rel[-1] != "zarr.json" and rel[-1] != schema.DATASET_MANIFEST_KEY and len(rel) >= 3:
                out["chunks"] += st.st_size
                out["chunk_objects"] += 1
            else:
                out["metadata"] += st.st_size
                continue
            out["units_allocated"] += st.st_blocks * 512
            out["units_logical"] += st.st_size
    out["units"] = units
    return out


# ------------------------------------------------------------------ fidelity
def _loss(name: str):
    return {
        "kd_T4": lambda tch, s, y: kd(s, tch, temperature=4.0),
        "dkd_T1": lambda tch, s, y: dkd(s, tch, y, alpha=1.0, beta=0.5, temperature=1.0),
        "nkd_T1": lambda tch, s, y: nkd(s, tch, y, gamma=1.5, temperature=1.0),
    }[name]


def _grad(name: str, teacher, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    s = student.detach().double().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(name)(teacher, s, target), s)
    return g * len(s)  # the sum over rows' gradient: folds add up to the whole batch's


def fidelity(parts: list[tuple[TopKLogits, torch.Tensor, torch.Tensor, torch.Tensor]],
             temps: tuple[float, ...]) -> dict[str, float]:
    """KL(dense || cache) at T = 1 and the gradient relative errors over ``parts`` of (cache rows, dense logits,
    student logits, targets) taken together."""
    kl_sum, n = 0.0, 0
    for tk, dense, _s, _y in parts:
        p = torch.log_softmax(dense.double(), 1)
        kl_sum += float((p.exp() * (p - tk.log_probs(1.0).double())).sum(1).sum())
        n += len(dense)
    out = {"kl_T1": kl_sum / n}
    for name in _gradient_names(temps):
        err = ref = 0.0
        for tk, dense, student, target in parts:
            g_ref = _grad(name, dense.double(), student, target)
            err += float((_grad(name, tk, student, target) - g_ref).pow(2).sum())
            ref += float(g_ref.pow(2).sum())
        out[f"grad_relerr_{name}"] = (err / ref) ** 0.5 if ref > 0 else 0.0
    return out


def _gradient_names(temps: tuple[float, ...]) -> list[str]:
    return [name for name in GRADIENTS if name != "kd_T4" or 4.0 in temps]


def redrawn_rows(meta: schema.GroupMeta, rule: TailRule, logits: torch.Tensor, target: torch.Tensor,
                 params: np.ndarray, generator: torch.Generator) -> TopKLogits:
    """Rows of ``logits`` with fresh tail draws from ``generator``, through the path a cache takes: the writer's
    `TopKLogits.from_logits` + `encode_topk`, the reader's `decode_unit` + `PackedUnit.topk` (only the lossless
    chunk compression is left out)."""
    codec = meta.packed_codec()
    tk = TopKLogits.from_logits(logits, target, meta.k, meta.temperatures, keep_rest=True, tail=rule,
                                generator=generator)
    decoded = decode_unit(codec, encode_topk(codec, tk, np.asarray(params, dtype=np.int16)), meta.temperatures)
    return schema.PackedUnit(decoded).topk(meta, target, tail=rule)


def expected_gradient(meta: schema.GroupMeta, rule: TailRule, logits: torch.Tensor, target: torch.Tensor,
                      student: torch.Tensor, params: np.ndarray, draws: int, *, block_rows: int = 2048,
                      seed: int = 1) -> dict[str, float]:
    """Per loss, over ``draws`` R independent encodings of the rows (`redrawn_rows`, seeded by ``seed``):
    ``expected_relerr_*`` = ||mean_r g_r - g_dense|| / ||g_dense|| (bias + Monte-Carlo noise), ``draw_relerr_*``
    = the RMS over r of ||g_r - g_dense|| / ||g_dense||, ``mc_floor_*`` = the standard error of the mean,
    sqrt(sum_r ||g_r - mean g||^2 / (R (R - 1))) / ||g_dense||, and ``bias_relerr_*`` = sqrt(max(0,
    expected^2 - floor^2)), the bias with the noise taken out. Draws go as many at a time as fit in
    ``block_rows`` rows (2048 x 1000 float64 is 16 MB: larger blocks spent more time in page faults than in
    arithmetic, measured)."""
    if draws < 2:
        raise ValueError(f"the expected gradient needs at least 2 draws, got {draws}")
    n = len(logits)
    names = _gradient_names(meta.temperatures)
    ref = {name: _grad(name, logits.double(), student, target) for name in names}
    total = {name: torch.zeros_like(ref[name]) for name in names}
    sq = dict.fromkeys(names, 0.0)  # sum over draws of ||g_r - g_dense||^2
    g = torch.Generator().manual_seed(seed)
    block = max(1, block_rows // max(n, 1))
    for start in range(0, draws, block):
        b = min(block, draws - start)
        rows = redrawn_rows(meta, rule, logits.repeat(b, 1), target.repeat(b), np.tile(params, (b, 1)), g)
        for name in names:
            # _grad sums the per-row gradients: each draw's block of n rows is one draw's gradient
            gr = _grad(name, rows, student.repeat(b, 1), target.repeat(b)).view(b, n, -1)
            total[name] += gr.sum(0)
            sq[name] += float((gr - ref[name]).pow(2).sum())
    out = {}
    for name in names:
        norm = float(ref[name].norm())
        mean_err2 = float((total[name] / draws - ref[name]).pow(2).sum())
        spread = max(sq[name] - draws * mean_err2, 0.0) / (draws - 1)  # sum_r ||g_r - mean||^2 / (R - 1)
        floor2 = spread / draws
        out[f"expected_relerr_{name}"] = mean_err2**0.5 / norm
        out[f"draw_relerr_{name}"] = (sq[name] / draws) ** 0.5 / norm
        out[f"mc_floor_{name}"] = floor2**0.5 / norm
        out[f"bias_relerr_{name}"] = max(mean_err2 - floor2, 0.0) ** 0.5 / norm
    return out


def oracle_uniform(logits: torch.Tensor, target: torch.Tensor, student: torch.Tensor, k: int) -> dict[str, float]:
    """KL and the KD (T = 4), DKD and NKD gradient errors of a cache that would store the top-k and the target
    EXACTLY (float64, no rounding, no bytes counted) with the uniform tail: what any deterministic cache naming
    these k classes can reach at best with this tail, whatever its codec (`bench_storage.py --oracle`)."""
    z = logits.double()
    known = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(k, 1).indices, True)
    known.scatter_(1, target[:, None], True)
    n_tail = (~known).sum(1, keepdim=True).clamp(min=1)

    def rebuilt(t: float) -> torch.Tensor:  # log-probabilities at t: the known ones exact, the rest uniform
        p = torch.softmax(z / t, 1)
        rest = p.masked_fill(known, 0.0).sum(1, keepdim=True)
        return torch.log(torch.where(known, p, rest / n_tail).clamp(min=1e-300))

    lp = torch.log_softmax(z, 1)
    out = {"k": k, "kl_T1": float((lp.exp() * (lp - rebuilt(1.0))).sum(1).mean())}
    for name in GRADIENTS:
        t = 4.0 if name == "kd_T4" else 1.0
        ref = _grad(name, z, student, target)
        # t * log p_t: logits whose softmax at t is the rebuilt distribution
        out[f"grad_relerr_{name}"] = float((_grad(name, t * rebuilt(t), student, target) - ref).norm() / ref.norm())
    return out


def class_prior(logits: torch.Tensor, target: torch.Tensor, k: int, batch: int = 2000) -> PriorTail:
    """The `prior` tail's class prior from calibration views, as `dump --tail prior` computes it."""
    acc = PriorAccumulator(logits.shape[1])
    for a in range(0, len(logits), batch):
        z, y = logits[a:a + batch], target[a:a + batch]
        acc.add(z, TopKLogits.from_logits(z, y, k).indices, y)
    return PriorTail(acc.prior(), prior_views=acc.views)


def weaker_student(dense: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A student for the gradient errors when none is at hand (`logitcache probe`): the teacher's logits at half
    the scale plus Gaussian noise of half their per-view standard deviation — less sure, often wrong where the
    teacher is unsure. Seeded: the same logits give the same student."""
    g = torch.Generator().manual_seed(seed)
    z = dense.double()
    return 0.5 * z + 0.5 * z.std(1, keepdim=True) * torch.randn(z.shape, generator=g, dtype=torch.float64)


def measure(setting: Setting, k: int, logits: torch.Tensor, target: torch.Tensor, student: torch.Tensor,
            views: np.ndarray, fields: tuple[str, ...], temps: tuple[float, ...], *,
            folds: list[tuple[np.ndarray, PriorTail | None]] | None = None, shard_size: int = 1000,
            draws: int = 0, draw_views: int = 500, **cache_kw) -> dict:
    """One row of the frontier: ``setting`` at ``k`` over the given rows (``folds``: row subsets, each written to
    its own cache with its own class prior; default all rows, no prior). Sizes are summed over the folds.
    ``draws`` > 0 and a `sampled` tail: also `expected_gradient` over R = ``draws`` on the first ``draw_views``
    rows (keys prefixed as there, plus ``draws`` and ``draw_views``)."""
    n = len(logits)
    folds = folds or [(np.arange(n), None)]
    parts, sz, codec = [], {}, ""
    for rows, prior in folds:
        idx = torch.as_tensor(rows)
        with tempfile.TemporaryDirectory() as tmp:
            url = f"{tmp}/c.zarr"
            lengths = write_cache(url, logits[idx], target[idx], views[rows], fields, k, temps, setting, prior,
                                  shard_size, **cache_kw)
            tk, reader = read_back(url, target[idx], lengths)
            for key, v in store_sizes(url, len(lengths)).items():
                sz[key] = sz.get(key, 0) + v
            codec, meta, rule = reader.codec_name, reader.meta, reader.tail
        parts.append((tk, logits[idx], student[idx], target[idx]))
    logical = sz["chunks"] + sz["markers"] + sz["metadata"]
    extra = {}
    if draws and parse_tail(setting.tail)[0] == "sampled":
        m = min(draw_views, n)
        extra = {"draws": draws, "draw_views": m,
                 **expected_gradient(meta, rule, logits[:m], target[:m], student[:m], views[:m], draws)}
    return {"k": k, "setting": setting.label, "format": setting.format, "codec": codec, "tail": setting.tail,
            "views": n, "bytes_per_view": logical / n, "chunk_bytes_per_view": sz["chunks"] / n,
            "marker_bytes_per_unit": sz["markers"] / sz["units"],
            "overhead_bytes_per_view": (sz["markers"] + sz["metadata"]) / n,
            "prior_bytes": sz["prior"] / len(folds),
            "allocated_over_logical": sz["allocated"] / (logical + sz["prior"]),
            "units_allocated_over_logical": sz["units_allocated"] / sz["units_logical"],
            "objects_per_unit": (sz["chunk_objects"] + sz["marker_objects"]) / sz["units"],
            **fidelity(parts, temps), **extra}
