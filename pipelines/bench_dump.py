"""Dump overhead: wall time of `logitcache dump` ÷ wall time of bare teacher inference over the same views
with the same loader (target ≤ 1.05). Both runs build the teacher, read the same synthetic ImageNet-sized JPEG
shards through the same `UnitViews` loader and run the same forward passes; the dump also keeps the top-k,
compresses and writes units. Runs alternate (bare, dump, bare, dump, ...) and the best of each is compared.

    .venv/bin/python pipelines/bench_dump.py [--teacher resnet34 --image-size 112 --views 1024] [--json]

The dump decodes each shard once for all its pending epochs (`UnitViews`); the views/s *per core* of that data
path alone, for E = 1, 2, 4, 8 epochs per decode, is reported by `bench_views_per_decode.py`, next to the
replay's views/s for the same numbers of views per decode (same images, same method).

The dump also pays fixed costs once per run (importing zarr, creating the cache, provenance, the summary:
about 0.15 s here), which amortise over a real dump; with 256 views (2 s) they alone read as +7%, so the
default is 1,024 views in units of 256.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch


def make_shards(out: str, n: int, per_shard: int, seed: int = 0) -> None:
    """Synthetic ImageNet-sized JPEGs (smooth random content, 500x375-ish), 1000 classes."""
    from PIL import Image

    from logitcache.data.write import write_shards

    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            h, w = int(rng.integers(333, 500)), int(rng.integers(375, 500))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield f"img{i:06d}", {"jpg": buf.getvalue(), "cls": str(int(rng.integers(0, 1000))).encode()}

    write_shards(samples(), out, class_names=[f"n{i:08d}" for i in range(1000)], samples_per_shard=per_shard)


def bare_inference(cfg) -> float:
    """The dump's loader and forward passes, nothing kept."""
    from logitcache.data.manifest import load_manifest
    from logitcache.dump import UnitViews
    from logitcache.teacher import Teacher
    from logitcache.views.recipe import get_recipe

    t0 = time.perf_counter()
    manifest = load_manifest(cfg.data)
    recipe = get_recipe(cfg.recipe, cfg.image_size)
    teacher = Teacher.load(cfg.teacher, None, manifest.num_classes, recipe.image_size, cfg.device, cfg.seed)
    pending = {s: list(range(cfg.epochs)) for s in range(len(manifest.shards))}
    loader = torch.utils.data.DataLoader(UnitViews(manifest, pending, recipe, cfg.seed, cfg.batch_size, False),
                                         batch_size=None, num_workers=cfg.workers, collate_fn=lambda b: b)
    with torch.inference_mode():
        for batch in loader:
            if len(batch.offsets):
                teacher.logits(batch.images)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    from logitcache.dump import DumpConfig, dump

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--views", type=int, default=1024, help="samples (one epoch, so one view each)")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(f"{tmp}/shards", args.views, args.per_shard)
        times = {"bare": [], "dump": []}
        for r in range(args.repeats):
            cfg = DumpConfig(data=f"{tmp}/shards", out=f"{tmp}/cache{r}.zarr", teacher=args.teacher, recipe="imagenet",
                             image_size=args.image_size, epochs=1, topk=args.topk, batch_size=args.batch_size,
                             workers=args.workers, progress=False)
            times["bare"].append(bare_inference(cfg))
            t0 = time.perf_counter()
            summary = dump(cfg)
            times["dump"].append(time.perf_counter() - t0)
    best_bare, best_dump = min(times["bare"]), min(times["dump"])
    result = {
        "benchmark": "dump_overhead", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "teacher": args.teacher, "image_size": args.image_size, "views": args.views, "topk": args.topk,
        "workers": args.workers, "bare_seconds": times["bare"], "dump_seconds": times["dump"],
        "bare_views_per_s": args.views / best_bare, "dump_views_per_s": args.views / best_dump,
        "overhead_ratio": best_dump / best_bare, "bytes_per_view": summary.bytes_per_view,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.teacher} at {args.image_size} px, {args.views} views, k={args.topk}, {args.workers} loader "
              f"worker(s), {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"bare teacher inference: {result['bare_views_per_s']:.1f} views/s  (runs {times['bare']})")
        print(f"logitcache dump:        {result['dump_views_per_s']:.1f} views/s  (runs {times['dump']})")
        print(f"dump / bare wall time:  {result['overhead_ratio']:.3f}  (target <= 1.05); "
              f"{result['bytes_per_view']:.1f} B/view (random teacher; see bench_storage for real figures)")
    return result


if __name__ == "__main__":
    main()
