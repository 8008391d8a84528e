"""Storage and fidelity of the cache at 1000 classes, through the real CacheWriter/CacheReader.

For each k it writes a cache of synthetic-teacher logits (see synthetic_teacher.py: a seeded stand-in with the
confidence of a trained ResNet-34; its figures are printed) with ImageNet-recipe view parameters, then reports
  * bytes per view, everything included (all five arrays, markers, metadata), and per array;
  * fidelity: KL(dense teacher || reconstruction from the cache) per view at T = 1 and T = 4, and the relative
    error of KD (T=4), DKD (T=1) and NKD (T=1) computed from the cache vs from the dense logits;
  * with k = C (the whole distribution stored) the loss error isolates the value dtype's rounding.
`--cache URL` also reports the bytes/view of an existing cache (e.g. the Fashion-MNIST demo's real teacher).

    .venv/bin/python pipelines/bench_storage.py [--views 10000] [--json]
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
from synthetic_teacher import describe, synthetic_teacher_logits  # noqa: E402

from logitcache.cache import schema  # noqa: E402
from logitcache.cache.reader import CacheReader
from logitcache.cache.schema import UnitRows  # noqa: E402
from logitcache.cache.writer import CacheWriter
from logitcache.labels.topk import TopKLogits  # noqa: E402

C = 1000
TEMPS = (1.0, 4.0)  # overridden by --temperatures


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


def write_cache(url, logits, target, views, fields, k, value_dtype, shard_size):
    n = len(target)
    lengths = tuple(min(shard_size, n - s) for s in range(0, n, shard_size))
    root = schema.RootMeta("synthetic", C, len(lengths), lengths)
    meta = schema.GroupMeta(
        teacher="synthetic", weights=None, weights_digest="-", num_classes=C,
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3}, recipe={"name": "imagenet"}, param_fields=fields,
        k=k, temperatures=TEMPS, seed=0, epochs=1, value_dtype=value_dtype, index_dtype=schema.index_dtype(C),
    )
    w = CacheWriter.create_or_open(url, "synthetic", meta, root, {})
    for s, length in enumerate(lengths):
        sl = slice(s * shard_size, s * shard_size + length)
        tk = TopKLogits.from_logits(logits[sl], target[sl], k, TEMPS)
        rows = UnitRows(tk.indices.numpy().astype(meta.index_dtype),
                        (tk.logits - tk.lse[:, :1]).numpy().astype(value_dtype), tk.target_logprob.numpy(),
                        tk.lse.numpy(), views[sl])
        w.write_unit(0, s, np.arange(length), rows, length, {"views": length})
    return lengths


def read_back(url, target, lengths):
    r = CacheReader(url)
    parts, start = [], 0
    for s, length in enumerate(lengths):
        parts.append(r.topk_rows(r.read_unit(0, s), np.arange(length), target[start:start + length]))
        start += length
    return TopKLogits.cat(parts), r


def sizes(r: CacheReader) -> dict[str, int]:
    fs, root = r.objects.fs, r.objects.root
    out = {name: 0 for name in schema.ARRAY_NAMES}
    out["markers"] = out["metadata"] = 0
    for path, info in fs.find(f"{root}/{r.group}", detail=True).items():
        rel = path[len(root) + 1:].split("/")
        if rel[1] in out and "c" in rel:
            out[rel[1]] += info["size"]
        elif rel[1] == schema.UNITS_DIR:
            out["markers"] += info["size"]
        else:
            out["metadata"] += info["size"]
    return out


def fidelity(tk: TopKLogits, dense: torch.Tensor, student: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from logitcache.losses import dkd, kd, nkd

    out = {}
    for t in (1.0, 4.0):
        if t not in TEMPS:
            continue
        p = torch.log_softmax(dense.double() / t, 1)
        q = tk.log_probs(t).double()
        out[f"kl_T{t:g}"] = float((p.exp() * (p - q)).sum(1).mean())
    pairs = {
        "kd_T4": lambda tch, s: kd(s, tch, temperature=4.0),
        "dkd_T1": lambda tch, s: dkd(s, tch, target, alpha=1.0, beta=0.5, temperature=1.0),
        "nkd_T1": lambda tch, s: nkd(s, tch, target, gamma=1.5, temperature=1.0),
    }
    if 4.0 not in TEMPS:
        del pairs["kd_T4"]
    for name, fn in pairs.items():
        s_ref = student.detach().clone().requires_grad_(True)
        ref = fn_at(fn, s_ref, dense)
        (g_ref,) = torch.autograd.grad(ref, s_ref)
        s_got = student.detach().clone().requires_grad_(True)
        got = fn_at(fn, s_got, tk)
        (g_got,) = torch.autograd.grad(got, s_got)
        out[f"relerr_{name}"] = abs(float(got) - float(ref)) / abs(float(ref))
        # what training feels: the gradient w.r.t. the student logits
        out[f"grad_relerr_{name}"] = float((g_got - g_ref).norm() / g_ref.norm())
    return out


def fn_at(fn, student, teacher):
    return fn(teacher, student)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=10000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--ks", default="1,5,10,20")
    ap.add_argument("--temperatures", default="1,4", help="temperatures recorded (each adds a float32 per view)")
    ap.add_argument("--cache", default=None, help="also report bytes/view of this existing cache")
    ap.add_argument("--json", action="store_true", help="print only a JSON summary")
    args = ap.parse_args(argv)
    global TEMPS
    TEMPS = tuple(float(t) for t in args.temperatures.split(","))
    torch.manual_seed(0)
    logits, target = synthetic_teacher_logits(args.views, C, seed=0)
    student, _ = synthetic_teacher_logits(args.views, C, seed=0, noise=2.6, scale=12.0)  # a weaker "student"
    views, fields = view_params(args.views, seed=0)
    result = {"benchmark": "storage", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "views": args.views,
              "num_classes": C, "temperatures": list(TEMPS), "teacher": describe(logits, target), "rows": []}
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for k, dtype, n in [*[(k, "float16", args.views) for k in ks], (C, "float16", min(args.views, 2000)),
                            (C, "float32", min(args.views, 2000))]:
            url = f"{tmp}/k{k}-{dtype}.zarr"
            lengths = write_cache(url, logits[:n], target[:n], views[:n], fields, k, dtype, args.shard_size)
            tk, r = read_back(url, target[:n], lengths)
            sz = sizes(r)
            row = {"k": k, "value_dtype": dtype, "views": n, "bytes_per_view": sum(sz.values()) / n,
                   "per_array_bytes_per_view": {a: b / n for a, b in sz.items()},
                   **fidelity(tk, logits[:n], student[:n], target[:n])}
            result["rows"].append(row)
    if args.cache:
        from logitcache.cache.verify import cache_info

        info = cache_info(args.cache)
        result["existing_cache"] = {g: {"bytes_per_view": v["bytes_per_view"], "k": v["k"], "views": v["views"],
                                        "teacher": v["teacher"], "teacher_top1": v["teacher_top1"],
                                        "mean_topk_mass": v["mean_topk_mass"]}
                                    for g, v in info["groups"].items()}
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    t = result["teacher"]
    print(f"temperatures recorded: {list(TEMPS)}")
    print(f"synthetic 1000-class teacher: accuracy {t['accuracy']:.3f}, mean top-1 prob {t['mean_top1_prob']:.3f}, "
          f"mean top-10 mass {t['mean_top10_mass']:.3f}  ({args.views} views, {os.cpu_count()} CPUs)")
    print(f"{'k':>5} {'values':>8} {'B/view':>7}  {'idx':>5} {'vals':>5} {'tgt':>4} {'lse':>4} {'view':>5} "
          f"{'mark':>5}  {'KL T=1':>9} {'KL T=4':>9}  {'KD err':>8} {'DKD err':>8} {'NKD err':>8}"
          f"  {'KD grad':>8} {'DKD grad':>8} {'NKD grad':>8}")
    nan = float("nan")
    for r in result["rows"]:
        a = r["per_array_bytes_per_view"]
        print(f"{r['k']:>5} {r['value_dtype']:>8} {r['bytes_per_view']:7.1f}  {a['topk_indices']:5.1f} "
              f"{a['topk_logprobs']:5.1f} {a['target_logprob']:4.1f} {a['lse']:4.1f} {a['view_params']:5.1f} "
              f"{a['markers'] + a['metadata']:5.2f}  {r['kl_T1']:9.2e} {r.get('kl_T4', nan):9.2e}  "
              f"{r.get('relerr_kd_T4', nan):8.1e} {r['relerr_dkd_T1']:8.1e} {r['relerr_nkd_T1']:8.1e}  "
              f"{r.get('grad_relerr_kd_T4', nan):8.1e} {r['grad_relerr_dkd_T1']:8.1e} {r['grad_relerr_nkd_T1']:8.1e}")
    for g, v in result.get("existing_cache", {}).items():
        print(f"existing cache group {g} ({v['teacher']}, k={v['k']}): {v['bytes_per_view']:.1f} B/view over "
              f"{v['views']} views; teacher top-1 {v['teacher_top1']:.3f}, mean top-k mass {v['mean_topk_mass']:.3f}")
    return result


if __name__ == "__main__":
    main()
