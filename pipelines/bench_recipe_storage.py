"""Benchmark: bytes per view of a cache at k = 10, C = 1000, one temperature, per view recipe (issue 15).

Same synthetic 1000-class teacher as ``bench_storage.py`` (its figures printed there); only the view parameters
differ: ``imagenet`` (crop box + flip, 5 int16) vs ``deit`` (crop box, flags, RandAugment, erasing, mix partner,
λ and CutMix box: 18 int16), drawn for typical ImageNet image sizes (300-500 px a side) with the unit's partner
cycles, 1000 views per shard. Reports the whole cache's bytes/view and the view-param array's bytes/view, and the
sum over fields of each field's empirical entropy (the floor for any coder that treats fields independently).

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


def recipe_params(name: str, n: int, shard_size: int, seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    """The stored params of ``n`` views of recipe ``name``, partners drawn per unit block as the dump does."""
    recipe = get_recipe(name, 224)
    rng = np.random.default_rng(seed)
    hs, ws = rng.integers(300, 501, n), rng.integers(300, 501, n)
    rows = np.stack([sample_view(view_rng(seed, 0, i), int(h), int(w), recipe).to_array()
                     for i, (h, w) in enumerate(zip(hs, ws, strict=True))]).astype(np.int16)
    if recipe.mixes:
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


def field_entropy_bytes(rows: np.ndarray) -> float:
    total = 0.0
    for j in range(rows.shape[1]):
        _, c = np.unique(rows[:, j], return_counts=True)
        p = c / len(rows)
        total += float(-(p * np.log2(p)).sum())
    return total / 8


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
        for name in ("imagenet", "deit"):
            views, fields = recipe_params(name, args.views, args.shard_size)
            url = os.path.join(tmp, f"{name}.zarr")
            write_synthetic_cache(url, logits, target, views, fields, args.shard_size)
            layouts = layout_bytes(views, args.shard_size)
            result["rows"].append({
                "recipe": name, "param_fields": len(fields), "bytes_per_view": cache_bytes(url) / args.views,
                "cache_format": list(schema.FORMAT_VERSION),
                "view_params_bytes_per_view_format1": layouts["format1_rows"],
                "view_params_bytes_per_view_format2": layouts["format2_fields"],
                "view_params_field_entropy_bytes": field_entropy_bytes(views),
            })
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    fmt = ".".join(str(v) for v in schema.FORMAT_VERSION)
    print(f"cache bytes/view at k={K}, C={C}, T=1, {args.views} synthetic views, format {fmt}, "
          f"by view recipe; then the view params alone as format 1 / format 2 lay them out:")
    print(f"{'recipe':>9} {'fields':>6} {'B/view':>7} {'params f1':>10} {'params f2':>10} {'entropy floor':>14}")
    for r in result["rows"]:
        print(f"{r['recipe']:>9} {r['param_fields']:>6} {r['bytes_per_view']:7.1f} "
              f"{r['view_params_bytes_per_view_format1']:10.1f} {r['view_params_bytes_per_view_format2']:10.1f} "
              f"{r['view_params_field_entropy_bytes']:14.1f}")
    return result


if __name__ == "__main__":
    main()
