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
The measurement itself lives in `logitcache.cache.fidelity`, shared with `logitcache probe`.

    .venv/bin/python pipelines/bench_storage.py [--views 10000] [--ks 5,10,20] [--temperatures 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_teacher import TEACHERS, describe, synthetic_teacher_logits  # noqa: E402

from logitcache.cache.fidelity import SETTINGS, class_prior, measure  # noqa: E402

C = 1000


def view_params(n: int, seed: int, version: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """ImageNet-recipe view parameters (its newest version unless ``version``) for n images of typical ImageNet
    sizes."""
    from logitcache.views.recipe import get_recipe, sample_view
    from logitcache.views.rng import view_rng

    recipe = get_recipe("imagenet", 224, version)
    rng = np.random.default_rng(seed)
    hs, ws = rng.integers(300, 501, n), rng.integers(300, 501, n)
    rows = [sample_view(view_rng(seed, 0, i), int(h), int(w), recipe).to_array() for i, (h, w) in
            enumerate(zip(hs, ws, strict=True))]
    return np.stack(rows).astype(np.int16), tuple(recipe.param_fields)


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
    ap.add_argument("--recipe-version", type=int, default=None,
                    help="version of the imagenet recipe whose view params are stored (default: the newest)")
    args = ap.parse_args(argv)
    temps = tuple(float(t) for t in args.temperatures.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    settings = [s for s in SETTINGS if args.settings is None or s.label in args.settings.split(",")]
    n, n_cal = args.views, 20 * C
    result = {"benchmark": "storage", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "views": n, "num_classes": C,
              "temperatures": list(temps), "calibration_views": n_cal, "teachers": {}, "rows": []}
    views, fields = view_params(n, seed=0, version=args.recipe_version)
    result["view_params"] = {"recipe": "imagenet", "fields": list(fields)}
    if not args.json:
        print(HEADER)
    for tname in args.teachers.split(","):
        kw = TEACHERS[tname]
        logits_all, target_all = synthetic_teacher_logits(n + n_cal, C, seed=0, **kw)
        logits, target, cal_logits, cal_target = logits_all[:n], target_all[:n], logits_all[n:], target_all[n:]
        student = synthetic_teacher_logits(n + n_cal, C, seed=0, noise=2.6, scale=12.0)[0][:n]  # a weaker one
        result["teachers"][tname] = {"settings": kw, **describe(logits, target)}
        for k in ks:
            prior = class_prior(cal_logits, cal_target, k) if any(st.tail == "prior" for st in settings) else None
            for st in settings:
                row = {"teacher": tname, **measure(st, k, logits, target, student, views, fields, temps,
                                                   folds=[(np.arange(n), prior)], shard_size=args.shard_size)}
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
        print(f"view params: imagenet recipe, fields {list(fields)}")
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
