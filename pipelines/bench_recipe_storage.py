"""Benchmark: bytes per view of a cache at k = 10, C = 1000, one temperature, per view recipe (issue 15).

Same synthetic 1000-class teacher as ``bench_storage.py`` (its figures printed there); only the view parameters
differ: ``imagenet`` v1 (crop box + flip, 5 int16) and v2 (four crop codes on the deit v2 grid + flip, 5 int16)
vs ``deit`` v1 (crop box, flags, RandAugment, erasing box and seed, mix partner, λ and CutMix box: 18 int16) and
v2 (the same on coarser grids, no stored seed or partner: 15 int16), and ``tv-v2`` v1 / v2 likewise, drawn for
typical ImageNet image sizes (300-500 px a side) with the unit's partner cycles, 1000 views per shard. Reports
the whole cache's bytes/view, the params' share of it (the cache minus the same cache with all params 0), the
view-param array alone as format 1 / format 2 lay it out, and
the sum over fields of each field's empirical entropy (the floor for any coder that treats fields independently).

    .venv/bin/python pipelines/bench_recipe_storage.py [--views 10000] [--json]
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
from synthetic_teacher import synthetic_teacher_logits  # noqa: E402 - the storage bench's synthetic teacher

from logitcache.cache import schema  # noqa: E402
from logitcache.cache.fidelity import FORMAT_2, write_cache  # noqa: E402 - the storage bench's cache writer
from logitcache.views.ops.mix import block_partners  # noqa: E402
from logitcache.views.recipe import get_recipe, sample_view  # noqa: E402
from logitcache.views.rng import view_rng  # noqa: E402

K = 10
C = 1000


def recipe_params(name: str, n: int, shard_size: int, seed: int = 0,
                  version: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The stored params of ``n`` views of recipe ``name``, partners drawn per unit block as the dump does
    (version 1 stores the partner; version 2 derives it from the unit and stores nothing for it)."""
    recipe = get_recipe(name, 224, version)
    rng = np.random.default_rng(seed)
    hs, ws = rng.integers(300, 501, n), rng.integers(300, 501, n)
    rows = np.stack([sample_view(view_rng(seed, 0, i), int(h), int(w), recipe).to_array()
                     for i, (h, w) in enumerate(zip(hs, ws, strict=True))]).astype(np.int16)
    if recipe.mixes and not recipe.coded:
        i_partner = recipe.field_index("mix_partner")
        for shard_start in range(0, n, shard_size):
            for b0 in range(shard_start, min(shard_start + shard_size, n), recipe.mix_block):
                offsets = list(range(b0 - shard_start, min(b0 + recipe.mix_block, n, shard_start + shard_size)
                                     - shard_start))
                block = offsets[0] // recipe.mix_block
                for o, p in block_partners(seed, 0, shard_start // shard_size, block, offsets).items():
                    rows[shard_start + o, i_partner] = p - o
    return rows, tuple(recipe.param_fields)


def layout_bytes(rows: np.ndarray, shard_size: int) -> dict[str, float]:
    """Bytes/view of the params alone, compressed per unit as the cache formats lay them out (Blosc zstd 9 with
    bit shuffle, as zarr's BloscCodec): format 1 = an (L, P) int16 chunk, row by row; format 2 = the P fields
    as rows of the unit's field x view matrix (uint16)."""
    import numcodecs

    blosc = numcodecs.Blosc("zstd", 9, numcodecs.Blosc.BITSHUFFLE)
    out = {"format1_rows": 0, "format2_fields": 0}
    for s in range(0, len(rows), shard_size):
        unit = np.ascontiguousarray(rows[s:s + shard_size])
        out["format1_rows"] += len(blosc.encode(unit))
        out["format2_fields"] += len(blosc.encode(np.ascontiguousarray(unit.T.astype(np.uint16))))
    return {k: v / len(rows) for k, v in out.items()}


def cache_bytes(url: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)


def write_synthetic_cache(url, logits, target, views, fields, shard_size) -> None:
    """The storage bench's writer (`logitcache.cache.fidelity`), format 2 with its default codec."""
    write_cache(url, logits, target, views, fields, K, (1.0,), FORMAT_2, None, shard_size)


def field_entropies(rows: np.ndarray, fields) -> dict[str, float]:
    """Empirical entropy of each field, bits per view."""
    out = {}
    for j, f in enumerate(fields):
        _, c = np.unique(rows[:, j], return_counts=True)
        p = c / len(rows)
        out[f] = float(-(p * np.log2(p)).sum())
    return out


def field_entropy_bytes(rows: np.ndarray) -> float:
    return sum(field_entropies(rows, range(rows.shape[1])).values()) / 8


def joint_entropy_bits(rows: np.ndarray) -> float:
    """Entropy of whole rows (a lower bound on any coder of these views; biased low when views are few)."""
    _, c = np.unique(rows, axis=0, return_counts=True)
    p = c / len(rows)
    return float(-(p * np.log2(p)).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=10000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    logits, target = synthetic_teacher_logits(args.views, C, seed=0)
    result = {"benchmark": "recipe_storage", "machine": platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "views": args.views, "k": K, "num_classes": C,
              "temperatures": [1.0], "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in (("imagenet", 1), ("imagenet", 2), ("deit", 1), ("deit", 2), ("tv-v2", 1), ("tv-v2", 2)):
            views, fields = recipe_params(name, args.views, args.shard_size, version=version)
            url = os.path.join(tmp, f"{name}-v{version}.zarr")
            write_synthetic_cache(url, logits, target, views, fields, args.shard_size)
            # the same cache with every param 0: the difference is what the params cost inside the real layout
            zero_url = os.path.join(tmp, f"{name}-v{version}-zero.zarr")
            write_synthetic_cache(zero_url, logits, target, np.zeros_like(views), fields, args.shard_size)
            layouts = layout_bytes(views, args.shard_size)
            result["rows"].append({
                "recipe": f"{name} v{version}", "param_fields": len(fields),
                "bytes_per_view": cache_bytes(url) / args.views,
                "view_params_bytes_per_view_in_cache": (cache_bytes(url) - cache_bytes(zero_url)) / args.views,
                "view_params_joint_entropy_bytes": joint_entropy_bits(views) / 8,
                "cache_format": list(schema.FORMAT_VERSION),
                "view_params_bytes_per_view_format1": layouts["format1_rows"],
                "view_params_bytes_per_view_format2": layouts["format2_fields"],
                "view_params_field_entropy_bytes": field_entropy_bytes(views),
                "field_entropy_bits": field_entropies(views, fields),
            })
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    fmt = ".".join(str(v) for v in schema.FORMAT_VERSION)
    print(f"cache bytes/view at k={K}, C={C}, T=1, {args.views} synthetic views, format {fmt}, "
          f"by view recipe; the params' share of it (cache minus the same cache with all params 0); the view "
          f"params alone as format 1 / format 2 lay them out; the sum of per-field entropies:")
    print(f"{'recipe':>11} {'fields':>6} {'B/view':>7} {'params in cache':>15} {'params f1':>10} {'params f2':>10} "
          f"{'entropy floor':>14}")
    for r in result["rows"]:
        print(f"{r['recipe']:>11} {r['param_fields']:>6} {r['bytes_per_view']:7.1f} "
              f"{r['view_params_bytes_per_view_in_cache']:15.1f} "
              f"{r['view_params_bytes_per_view_format1']:10.1f} {r['view_params_bytes_per_view_format2']:10.1f} "
              f"{r['view_params_field_entropy_bytes']:14.1f}")
    print("per-field entropy, bits/view:")
    for r in result["rows"]:
        print(f"  {r['recipe']}: " + ", ".join(f"{f} {b:.2f}" for f, b in r["field_entropy_bits"].items()))
    return result


if __name__ == "__main__":
    main()
