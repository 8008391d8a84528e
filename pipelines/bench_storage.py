"""Storage and fidelity of the cache at 1000 classes, through the real CacheWriter/CacheReader: the frontier.

For two synthetic teachers (synthetic_teacher.py: the default one, with the confidence of a trained ResNet-34,
and a heavier-tailed one, mean top-10 mass ~0.85; their figures are printed), each k and each storage setting —
format 1 (float16 values, uniform tail), format 2 (the packed codec at its default and at a smaller setting) with
the uniform tail, and format 2 with the `prior` and `sampled` tails — it writes a cache of the teacher's logits
with ImageNet-recipe view parameters and reports
  * bytes per view, everything included (chunks, markers, metadata; the `prior` tail's once-per-group matrix is
    shown separately, as it amortises over the whole dataset), the allocated bytes a local filesystem uses for
    them (`du`) over the logical bytes — for the whole small cache ("alloc/log") and for the unit objects alone
    ("units": chunks and their records, without the fixed metadata files and folders, i.e. the ratio at
    ImageNet scale) — and stored objects per unit;
  * fidelity against the dense teacher: KL(dense || cache) at T = 1, and the relative error of the gradient
    (w.r.t. the student logits) of KD (T = 4, when recorded), DKD and NKD computed from the cache vs the dense
    logits. For `sampled` (random) the table's error is that of ONE draw (the cache's); a second line gives,
    on the first --draw-views views, the error of the MEAN gradient over --draws R fresh draws through the same
    codec (the bias SGD sees, each cached view carrying its own draw), the RMS one-draw error there, and the
    Monte-Carlo floor of that mean (its standard error, ~ one-draw / sqrt(R)); "bias" is the mean's error with
    the floor taken out in quadrature. Deterministic tails: expected error = the one-draw error.
`--oracle` adds, per teacher, the errors of EXACT top-k values (float64) + the target + the uniform tail at
k = 10, 14, 20, 30, 40 (no bytes, no rounding), and the bits arithmetic of --budget B/view: how many more
classes the bytes left over format 2 at k = 10 can name, against how many the oracle needs for --target.
The `prior` tail's class prior comes from separate calibration views of the same teacher (20 per class), as
`dump --tail prior` takes it from the first views of the dump.
`--cache URL` also reports an existing cache (e.g. the Fashion-MNIST demo's real teacher).
The measurement itself lives in `logitcache.cache.fidelity`, shared with `logitcache probe`.

    .venv/bin/python pipelines/bench_storage.py [--views 10000] [--ks 5,10,20] [--temperatures 1] [--json]
        [--settings "format 2,format 2 sampled:4"] [--draws 256] [--draw-views 500] [--oracle]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_teacher import TEACHERS, describe, synthetic_teacher_logits  # noqa: E402

from logitcache.cache.fidelity import FORMAT_2, SETTINGS, class_prior, measure, oracle_uniform  # noqa: E402

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
    ap.add_argument("--draws", type=int, default=256,
                    help="sampled tails: draws R for the expected gradient (0: one draw only)")
    ap.add_argument("--draw-views", type=int, default=500, help="views the expected gradient is measured on")
    ap.add_argument("--oracle", action="store_true",
                    help="also the exact-values + uniform-tail errors at --oracle-ks and the bits arithmetic")
    ap.add_argument("--oracle-ks", default="10,14,20,30,40")
    ap.add_argument("--budget", type=float, default=32.0, help="B/view of the --oracle bits arithmetic")
    ap.add_argument("--target", type=float, default=0.02, help="NKD gradient error the --oracle asks for")
    args = ap.parse_args(argv)
    temps = tuple(float(t) for t in args.temperatures.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    wanted = args.settings.split(",") if args.settings else [st.label for st in SETTINGS]
    unknown = sorted(set(wanted) - {st.label for st in SETTINGS})
    if unknown:
        ap.error(f"unknown setting(s) {unknown}: one of {[st.label for st in SETTINGS]}")
    settings = [st for st in SETTINGS if st.label in wanted]
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
                                                   folds=[(np.arange(n), prior)], shard_size=args.shard_size,
                                                   draws=args.draws, draw_views=args.draw_views)}
                result["rows"].append(row)
                if not args.json:
                    print(_fmt(row), flush=True)
                    if "draws" in row:
                        print(_fmt_expected(row), flush=True)
        if args.oracle:
            result.setdefault("oracle", {})[tname] = oracle(args, result["rows"], tname, logits, target, student,
                                                            views, fields, temps)
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


def oracle(args, rows: list[dict], tname: str, logits, target, student, views, fields, temps) -> dict:
    """Exact top-k + uniform tail at --oracle-ks, and the bits --budget leaves over format 2 at k = 10."""
    ks = [int(k) for k in args.oracle_ks.split(",")]
    table = [oracle_uniform(logits, target, student, k) for k in ks]
    f2 = next((r for r in rows if r["teacher"] == tname and r["k"] == 10 and r["setting"] == FORMAT_2.label), None)
    if f2 is None:
        f2 = measure(FORMAT_2, 10, logits, target, student, views, fields, temps, shard_size=args.shard_size)
    unknown = C - 10  # classes a k = 10 row does not name (one fewer when the target is outside the top-10)
    bits = 8 * (args.budget - f2["bytes_per_view"])
    nameable = next(j for j in range(unknown + 1) if j == unknown or _log2_binom(unknown, j + 1) > bits)
    need = next((r["k"] for r in table if r["grad_relerr_nkd_T1"] <= args.target), None)
    out = {"rows": table, "format2_k10_bytes_per_view": f2["bytes_per_view"], "budget": args.budget,
           "bits_left": bits, "classes_nameable": nameable, "nameable_bits": _log2_binom(unknown, nameable),
           "target": args.target, "k_needed": need,
           "bits_to_name_needed": None if need is None else _log2_binom(unknown, need - 10)}
    if not args.json:
        print(f"oracle, teacher {tname}: EXACT float64 top-k + target, uniform tail (no rounding, bytes not counted)")
        print(f"{'k':>4} {'KL T=1':>7} {'KD4 grad':>8} {'DKD grad':>8} {'NKD grad':>8}")
        for r in table:
            print(f"{r['k']:4d} {r['kl_T1']:7.4f} {r['grad_relerr_kd_T4']:8.4f} {r['grad_relerr_dkd_T1']:8.4f} "
                  f"{r['grad_relerr_nkd_T1']:8.4f}")
        print(f"bits: format 2 at k = 10 is {f2['bytes_per_view']:.2f} B/view, so {args.budget:g} B leaves "
              f"{bits:.0f} bits/view; naming j more of the {unknown} other classes costs log2 C({unknown}, j) bits "
              f"(values not counted): at most {nameable} more ({out['nameable_bits']:.1f} bits).")
        if need is None:
            print(f"no k in {ks} reaches NKD <= {args.target:.0%} even with exact values")
        else:
            print(f"NKD <= {args.target:.0%} with exact values and the uniform tail needs k = {need}: naming "
                  f"{need - 10} more classes alone costs {out['bits_to_name_needed']:.0f} bits > {bits:.0f}.")
    return out


def _log2_binom(n: int, j: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)) / math.log(2)


HEADER = (f"{'teacher':>8} {'k':>3} {'setting':<20} {'B/view':>7} {'chunks':>6} {'ovh':>5} {'prior kB':>8} "
          f"{'alloc/log':>9} {'units':>5} {'obj/unit':>8} {'KL T=1':>7} {'KD4 grad':>8} {'DKD grad':>8} "
          f"{'NKD grad':>8}")


def _fmt(r) -> str:
    nan = float("nan")
    return (f"{r['teacher']:>8} {r['k']:>3} {r['setting']:<20} {r['bytes_per_view']:7.2f} "
            f"{r['chunk_bytes_per_view']:6.2f} {r['overhead_bytes_per_view']:5.2f} {r['prior_bytes'] / 1e3:8.0f} "
            f"{r['allocated_over_logical']:9.2f} {r['units_allocated_over_logical']:5.2f} "
            f"{r['objects_per_unit']:8.1f} {r['kl_T1']:7.4f} "
            f"{r.get('grad_relerr_kd_T4', nan):8.4f} {r['grad_relerr_dkd_T1']:8.4f} {r['grad_relerr_nkd_T1']:8.4f}")


def _fmt_expected(r) -> str:
    parts = [f"{label} {r[f'expected_relerr_{key}']:.4f} (one draw {r[f'draw_relerr_{key}']:.4f}, MC floor "
             f"{r[f'mc_floor_{key}']:.4f}, bias {r[f'bias_relerr_{key}']:.4f})"
             for label, key in (("KD4", "kd_T4"), ("DKD", "dkd_T1"), ("NKD", "nkd_T1"))
             if f"expected_relerr_{key}" in r]
    return f"{'':>12} expected gradient, {r['draws']} draws on {r['draw_views']} views: " + "; ".join(parts)


if __name__ == "__main__":
    main()
