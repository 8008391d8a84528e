"""Storage and fidelity of the cache at 1000 classes, through the real CacheWriter/CacheReader: the frontier.

For two synthetic teachers (synthetic_teacher.py: the default one, with the confidence of a trained ResNet-34,
and a heavier-tailed one, mean top-10 mass ~0.85; their figures are printed), each k and each storage setting —
format 1 (float16 values, uniform tail), format 2 (the packed codec at its default and at a smaller setting) with
the uniform tail, and format 2 with the `prior` and `sampled` tails — it writes a cache of the teacher's logits
with ImageNet-recipe view parameters and reports
  * bytes per view, everything included (chunks, markers, metadata; the `prior` tail's once-per-group matrix is
    shown separately, as it amortises over the whole dataset), the allocated bytes a local filesystem uses for
    them (`du`), and stored objects per unit;
  * fidelity against the dense teacher: KL(dense || cache) at T = 1, and the relative error of the gradient
    (w.r.t. the student logits) of KD (T = 4, when recorded), DKD and NKD computed from the cache vs the dense
    logits. For `sampled` (unbiased but random) the error is that of ONE draw; its expectation is checked in
    tests/test_codecs.py.
The `prior` tail's class prior comes from separate calibration views of the same teacher (20 per class), as
`dump --tail prior` takes it from the first views of the dump.
`--cache URL` also reports an existing cache (e.g. the Fashion-MNIST demo's real teacher).

    .venv/bin/python pipelines/bench_storage.py [--views 10000] [--ks 5,10,20] [--temperatures 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_teacher import TEACHERS, describe, synthetic_teacher_logits  # noqa: E402

from logitcache.cache import schema  # noqa: E402
from logitcache.cache.reader import CacheReader  # noqa: E402
from logitcache.cache.writer import CacheWriter  # noqa: E402
from logitcache.labels.codecs import PackedCodec  # noqa: E402
from logitcache.labels.tails import PriorAccumulator, PriorTail, parse_tail, tail_from_settings, tail_settings  # noqa: E402
from logitcache.labels.topk import TopKLogits  # noqa: E402

C = 1000
#: (label, format, codec settings, tail)
SETTINGS = (
    ("format 1 (fp16)", 1, {}, "uniform"),
    ("format 2", 2, {}, "uniform"),
    ("format 2 small", 2, {"step_bits": 4, "knee": 4.0}, "uniform"),
    ("format 2 prior", 2, {}, "prior"),
    ("format 2 sampled:8", 2, {}, "sampled:8"),
)


def view_params(n: int, seed: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """ImageNet-recipe view parameters for n images of typical ImageNet sizes."""
    from logitcache.views.recipe import get_recipe, sample_view
    from logitcache.views.rng import view_rng

    recipe = get_recipe("imagenet", 224)
    rng = np.random.default_rng(seed)
    hs, ws = rng.integers(300, 501, n), rng.integers(300, 501, n)
    rows = [sample_view(view_rng(seed, 0, i), int(h), int(w), recipe).to_array() for i, (h, w) in
            enumerate(zip(hs, ws, strict=True))]
    return np.stack(rows).astype(np.int16), tuple(recipe.param_fields)


def write_cache(url, logits, target, views, fields, k, temps, fmt, codec_kw, tail, prior, shard_size):
    n = len(target)
    lengths = tuple(min(shard_size, n - s) for s in range(0, n, shard_size))
    root = schema.RootMeta("synthetic", C, len(lengths), lengths, format_version=(fmt, 0))
    name, m = parse_tail(tail)
    kw = {}
    if fmt == 2:
        codec = PackedCodec(k, C, len(temps), len(fields), tail_samples=m, **codec_kw)
        kw = {"codec": codec.to_json(), "tail": tail_settings(tail, prior_views=prior.prior_views if prior else 0),
              "value_dtype": None, "index_dtype": None}
    meta = schema.GroupMeta(
        teacher="synthetic", weights=None, weights_digest="-", num_classes=C,
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3}, recipe={"name": "imagenet"}, param_fields=fields,
        k=k, temperatures=temps, seed=0, epochs=1, **kw,
    )
    w = CacheWriter.create_or_open(url, "synthetic", meta, root, {}, prior=prior.prior if name == "prior" else None)
    rule = tail_from_settings(meta.tail, prior.prior if name == "prior" else None) if fmt == 2 else None
    g = torch.Generator().manual_seed(0)
    for s, length in enumerate(lengths):
        sl = slice(s * shard_size, s * shard_size + length)
        tk = TopKLogits.from_logits(logits[sl], target[sl], k, temps, keep_rest=fmt == 2,
                                    **({"tail": rule, "generator": g} if rule is not None else {}))
        w.write_unit(0, s, np.arange(length), w.encode_rows(tk, views[sl]), length, {"views": length})
    return lengths


def read_back(url, target, lengths):
    r = CacheReader(url)
    parts, start = [], 0
    for s, length in enumerate(lengths):
        parts.append(r.topk_rows(r.read_unit(0, s), np.arange(length), target[start:start + length]))
        start += length
    return TopKLogits.cat(parts), r


def sizes(url: str, group: str, units: int) -> dict[str, float]:
    """Logical bytes by kind, allocated bytes (st_blocks, what `du` counts, directories included) and objects."""
    out = {"chunks": 0, "prior": 0, "markers": 0, "metadata": 0, "allocated": 0, "objects": 0, "chunk_objects": 0}
    for dirpath, _dirs, files in os.walk(url):
        out["allocated"] += os.stat(dirpath).st_blocks * 512
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out["allocated"] += st.st_blocks * 512
            out["objects"] += 1
            rel = os.path.relpath(p, url).split(os.sep)
            if len(rel) >= 3 and rel[1] == schema.UNITS_DIR:
                out["markers"] += st.st_size
            elif len(rel) >= 3 and rel[1] == schema.TAIL_PRIOR and rel[-1] != "zarr.json":
                out["prior"] += st.st_size
            elif rel[-1] != "zarr.json" and rel[-1] != schema.DATASET_MANIFEST_KEY and len(rel) >= 3:
                out["chunks"] += st.st_size
                out["chunk_objects"] += 1
            else:
                out["metadata"] += st.st_size
    out["objects_per_unit"] = (out["chunk_objects"] + units) / units
    return out


def fidelity(tk: TopKLogits, dense, student, target, temps) -> dict[str, float]:
    from logitcache.losses import dkd, kd, nkd

    p = torch.log_softmax(dense.double(), 1)
    out = {"kl_T1": float((p.exp() * (p - tk.log_probs(1.0).double())).sum(1).mean())}
    pairs = {
        "kd_T4": lambda tch, s: kd(s, tch, temperature=4.0),
        "dkd_T1": lambda tch, s: dkd(s, tch, target, alpha=1.0, beta=0.5, temperature=1.0),
        "nkd_T1": lambda tch, s: nkd(s, tch, target, gamma=1.5, temperature=1.0),
    }
    if 4.0 not in temps:
        del pairs["kd_T4"]
    for name, fn in pairs.items():
        s_ref = student.detach().clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(fn(dense, s_ref), s_ref)
        s_got = student.detach().clone().requires_grad_(True)
        (g_got,) = torch.autograd.grad(fn(tk, s_got), s_got)
        out[f"grad_relerr_{name}"] = float((g_got - g_ref).norm() / g_ref.norm())
    return out


def class_prior(logits, target, k, n_cal) -> PriorTail:
    acc = PriorAccumulator(C)
    for a in range(0, n_cal, 2000):
        tk = TopKLogits.from_logits(logits[a:a + 2000], target[a:a + 2000], k)
        acc.add(logits[a:a + 2000], tk.indices, target[a:a + 2000])
    return PriorTail(acc.prior(), prior_views=acc.views)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=10000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--temperatures", default="1", help="temperatures recorded (one by default, as in the issue)")
    ap.add_argument("--teachers", default=",".join(TEACHERS))
    ap.add_argument("--settings", default=None, help="comma-separated labels of SETTINGS to run (default: all)")
    ap.add_argument("--cache", default=None, help="also report an existing cache (bytes/view, format, codec)")
    ap.add_argument("--json", action="store_true", help="print only a JSON summary")
    args = ap.parse_args(argv)
    temps = tuple(float(t) for t in args.temperatures.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    settings = [s for s in SETTINGS if args.settings is None or s[0] in args.settings.split(",")]
    n, n_cal = args.views, 20 * C
    result = {"benchmark": "storage", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "views": n, "num_classes": C,
              "temperatures": list(temps), "calibration_views": n_cal, "teachers": {}, "rows": []}
    views, fields = view_params(n, seed=0)
    if not args.json:
        print(HEADER)
    for tname in args.teachers.split(","):
        kw = TEACHERS[tname]
        logits_all, target_all = synthetic_teacher_logits(n + n_cal, C, seed=0, **kw)
        logits, target, cal_logits, cal_target = logits_all[:n], target_all[:n], logits_all[n:], target_all[n:]
        student = synthetic_teacher_logits(n + n_cal, C, seed=0, noise=2.6, scale=12.0)[0][:n]  # a weaker one
        result["teachers"][tname] = {"settings": kw, **describe(logits, target)}
        for k in ks:
            prior = class_prior(cal_logits, cal_target, k, n_cal) if any(s[3] == "prior" for s in settings) else None
            for label, fmt, codec_kw, tail in settings:
                with tempfile.TemporaryDirectory() as tmp:
                    url = f"{tmp}/c.zarr"
                    lengths = write_cache(url, logits, target, views, fields, k, temps, fmt, codec_kw, tail,
                                          prior, args.shard_size)
                    tk, r = read_back(url, target, lengths)
                    sz = sizes(url, "synthetic", len(lengths))
                    logical = sz["chunks"] + sz["markers"] + sz["metadata"]
                    codec = r.codec_name
                    row = {"teacher": tname, "k": k, "setting": label, "format": fmt, "codec": codec,
                           "tail": tail, "bytes_per_view": logical / n,
                           "chunk_bytes_per_view": sz["chunks"] / n,
                           "overhead_bytes_per_view": (sz["markers"] + sz["metadata"]) / n,
                           "prior_bytes": sz["prior"],
                           "allocated_over_logical": sz["allocated"] / (logical + sz["prior"]),
                           "objects_per_unit": sz["objects_per_unit"],
                           **fidelity(tk, logits, student, target, temps)}
                    result["rows"].append(row)
                if not args.json:
                    print(_fmt(row), flush=True)
    if args.cache:
        from logitcache.cache.verify import cache_info

        info = cache_info(args.cache)
        result["existing_cache"] = {g: {key: v.get(key) for key in (
            "format", "codec", "tail", "bytes_per_view", "allocated_bytes", "bytes", "objects_per_unit", "k",
            "views", "teacher", "teacher_top1", "mean_topk_mass")} for g, v in info["groups"].items()}
        if not args.json:
            for g, v in result["existing_cache"].items():
                print(f"existing cache group {g}: {json.dumps(v)}")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for tname, t in result["teachers"].items():
            print(f"teacher {tname}: accuracy {t['accuracy']:.3f}, mean top-1 prob {t['mean_top1_prob']:.3f}, "
                  f"mean top-10 mass {t['mean_top10_mass']:.3f}")
        print(f"{n} views, temperatures {list(temps)}, {os.cpu_count()} CPUs (shared); prior from {n_cal} "
              f"calibration views")
    return result


HEADER = (f"{'teacher':>8} {'k':>3} {'setting':<20} {'B/view':>7} {'chunks':>6} {'ovh':>5} {'prior kB':>8} "
          f"{'alloc/log':>9} {'obj/unit':>8} {'KL T=1':>7} {'KD4 grad':>8} {'DKD grad':>8} {'NKD grad':>8}")


def _fmt(r) -> str:
    nan = float("nan")
    return (f"{r['teacher']:>8} {r['k']:>3} {r['setting']:<20} {r['bytes_per_view']:7.2f} "
            f"{r['chunk_bytes_per_view']:6.2f} {r['overhead_bytes_per_view']:5.2f} {r['prior_bytes'] / 1e3:8.0f} "
            f"{r['allocated_over_logical']:9.2f} {r['objects_per_unit']:8.1f} {r['kl_T1']:7.4f} "
            f"{r.get('grad_relerr_kd_T4', nan):8.4f} {r['grad_relerr_dkd_T1']:8.4f} {r['grad_relerr_nkd_T1']:8.4f}")


if __name__ == "__main__":
    main()
