"""Benchmark (issue 17): several cached views from one decoded image (`--views-per-decode N`).

Data: synthetic ImageNet-size photo-like JPEGs (`photo`): 1/f-like colour noise at three scales, 4-9 slightly
blurred filled ellipses/polygons (object edges), and luminance-dominant grain plus mid-frequency texture whose
strength varies by region; about 500x375 (seven ImageNet aspect ratios), quality 90, mean about 105 kB (ImageNet
train: ~110 kB). A cache of E = 8 epochs is dumped over them (teacher `smallcnn`, random init, top-10, 1000
classes, ``--recipe``, default the newest imagenet (v3: torch resizes the uint8 crop), at 224 px) — the teacher
does not enter any figure below. ``--compare-recipe imagenet@2`` also dumps a cache of that recipe (v2: Pillow
resizes) and measures its replay at N = 1 and 4 in the same rounds, for the per-view cost of the two resizes.

1. Data path per core (no model): one process, torch and PIL single-threaded, ``DataLoader(workers=0)`` with
   `collate`; views per CPU second of the process (= per core, and steady on a shared machine), wall-clock
   views/s alongside. Replay: `CachedViews(views_per_decode=N)` over all 8 cached epochs (8/N passes), N = 1, 2, 4, 8;
   views/s and the ratio to N = 1 (target: N = 4 >= 2.0). The dump's data path (`UnitViews`, which decodes a
   shard once for all its pending epochs) is reported the same way: views/s for E = 1, 2, 4, 8 epochs per decode.
   ``--stages``: where the time goes, in CPU milliseconds: read + decode per image; per view the steps of
   `apply_view` for the recipe (v3: the antialiased resize of the crop's tensor and the flip; Pillow recipes: the
   crop to PIL, or with N >= 3 views per decode the image to PIL once per image and a crop of it per view, the
   resize, PIL to tensor, the flip), the soft-label row, and the collation of a batch.
2. End to end (``--e2e``): `train` in a data-bound setting — a student far cheaper than decoding (`tiny224`: one
   8x8/8 patchify conv to 8 channels, global pool, linear; registered by this script), 224 px, batch 32, the same
   ``--workers`` for both: cached NKD with N = 4 vs plain CE with N = 1, images (views) per second of training
   time summed over all logged epochs (metrics.jsonl); target ratio >= 1.5.

Rounds are interleaved and the best of ``--repeats`` is kept, so a noisy neighbour hurts every contender alike;
the figures are ratios from one run on this machine (printed with its CPU count and load average). On a shared
machine a burst of load can still land on one contender's best round, so the median over rounds of each round's
own ratio (N = 1 and N measured seconds apart) is printed too: the steadier figure of the two.

    .venv/bin/python pipelines/bench_views_per_decode.py [--images 64] [--repeats 3] [--stages] [--e2e]
        [--recipe imagenet] [--compare-recipe imagenet@2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from logitcache.cache.reader import CacheReader, UnitTable
from logitcache.data.manifest import load_manifest
from logitcache.data.shards import iter_shard
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, UnitViews, dump
from logitcache.models.zoo import IMAGENET_MEAN, IMAGENET_STD, LOCAL_MODELS, ModelSpec
from logitcache.replay import CachedViews, collate
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.views.ops.geometry import _from_pil, _to_pil, resize_tensor
from logitcache.views.recipe import Recipe, crop_box, get_recipe, view_source

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 375), (400, 300))
CACHED_EPOCHS = 8


def photo(rng: np.random.Generator, w: int, h: int, quality: int = 90) -> bytes:
    """One photo-like JPEG (see the module docstring)."""
    img = np.zeros((h, w, 3), np.float32)
    for scale, amp in ((64, 45), (16, 25), (4, 12)):  # smooth colour fields, coarse to fine
        small = rng.normal(0, 1, (h // scale + 2, w // scale + 2, 3)).astype(np.float32)
        up = Image.fromarray(np.uint8(np.clip(128 + 40 * small, 0, 255))).resize((w, h), Image.Resampling.BICUBIC)
        img += amp * (np.asarray(up, np.float32) - 128) / 40
    img += rng.uniform(60, 190, 3)
    layer = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(4, 10))):  # objects: filled shapes with sharp-ish edges
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 150)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=colour)
        else:
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, 5))],
                         fill=colour)
    arr = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    mask = np.asarray(Image.fromarray(np.uint8(rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2)))).resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)[..., None] / 255  # where the texture is strong
    mid = np.asarray(Image.fromarray(np.uint8(np.clip(128 + 40 * rng.normal(0, 1, (h // 2, w // 2)), 0, 255))).resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)[..., None] / 40 - 3.2
    grain = 0.75 * rng.normal(0, 1, (h, w, 1)) + 0.35 * rng.normal(0, 1, arr.shape) + 0.8 * mid
    arr = arr + grain.astype(np.float32) * (13 + 28 * mask)
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(arr, 0, 255))).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_data(root: str, n: int, per_shard: int) -> tuple[str, float]:
    """Shards of n photos; returns (data, mean JPEG kB)."""
    rng = np.random.default_rng(0)
    blobs = [photo(rng, *SIZES[i % len(SIZES)]) for i in range(n)]
    data = os.path.join(root, "shards")
    write_shards(((f"img{i:06d}", {"jpg": b, "cls": str(i % 1000).encode()}) for i, b in enumerate(blobs)), data,
                 class_names=[f"n{i:08d}" for i in range(1000)], samples_per_shard=per_shard)
    return data, float(np.mean([len(b) for b in blobs]) / 1e3)


def make_cache(root: str, data: str, recipe: str) -> str:
    """A CACHED_EPOCHS-epoch cache of ``recipe`` views over the shards (teacher irrelevant to the figures)."""
    cache = os.path.join(root, f"cache-{recipe.replace('@', '-v')}.zarr")
    dump(DumpConfig(data=data, out=cache, teacher="smallcnn", recipe=recipe, image_size=224,
                    epochs=CACHED_EPOCHS, topk=10, batch_size=64, progress=False))
    return cache


def replay_rate(data: str, cache: str, n_views: int, batch_size: int) -> tuple[float, float]:
    """(views per CPU second, views per wall second) of decode + replay over all cached epochs, in passes of
    n_views epochs, one single-threaded process."""
    t0, c0, views = time.perf_counter(), time.process_time(), 0
    for first in range(0, CACHED_EPOCHS, n_views):
        ds = CachedViews(data, cache, epoch=first, shuffle_seed=0, views_per_decode=n_views, batch_size=batch_size)
        for images, _, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate):
            views += len(images)
    return views / (time.process_time() - c0), views / (time.perf_counter() - t0)


def dump_rate(data: str, recipe_name: str, n_epochs: int, batch_size: int) -> tuple[float, float]:
    """(views per CPU second, per wall second) of the dump's data path (`UnitViews`: a shard decoded once for its
    pending epochs), no teacher."""
    manifest, recipe = load_manifest(data), get_recipe(recipe_name, 224)
    t0, c0, views = time.perf_counter(), time.process_time(), 0
    for first in range(0, CACHED_EPOCHS, n_epochs):
        pending = {s: list(range(first, first + n_epochs)) for s in range(len(manifest.shards))}
        for batch in UnitViews(manifest, pending, recipe, 0, batch_size, False):
            views += len(batch.offsets)
    return views / (time.process_time() - c0), views / (time.perf_counter() - t0)


def stage_costs(data: str, cache: str, batch_size: int, repeats: int) -> dict[str, float]:
    """CPU milliseconds of each step of the replay path (best of ``repeats``): per image the read + decode, per
    view (all cached epochs of every image) the steps of `apply_view` for this recipe, the row and the collation."""
    manifest, reader = load_manifest(data), CacheReader(cache, None)
    recipe = Recipe.from_json(reader.meta.recipe)
    tables = {(e, s): UnitTable(reader, e, s) for e in range(CACHED_EPOCHS) for s in range(len(manifest.shards))}
    best: dict[str, float] = {}

    def clock(name: str, per: int, t0: float) -> None:
        best[name] = min(best.get(name, float("inf")), (time.process_time() - t0) * 1e3 / per)

    for _ in range(repeats):
        t0 = time.process_time()
        samples = [(s, x) for s in range(len(manifest.shards)) for x in iter_shard(manifest, s)]
        clock("read + decode (per image)", len(samples), t0)
        views = [(x, tables[(e, s)], recipe.params_from_array(np.asarray(tables[(e, s)].view_params[x.offset],
                                                                         np.int16)))
                 for s, x in samples for e in range(CACHED_EPOCHS)]
        t0 = time.process_time()
        boxes = [crop_box(p, recipe, *x.image.shape[1:]) for x, _, p in views]  # v2/v3: from the crop codes
        clock("crop box from the codes", len(views), t0)
        tensors = (_torch_stages if recipe.torch_mode else _pillow_stages)(recipe, samples, views, boxes, clock)
        t0 = time.process_time()
        tensors = [torch.flip(x, dims=(-1,)) if p.flip else x for x, (_, _, p) in zip(tensors, views, strict=True)]
        clock("flip (tensor)", len(views), t0)
        t0 = time.process_time()
        rows = [table.row(x.offset, x.label) for x, table, _ in views]
        clock("soft-label row", len(views), t0)
        t0 = time.process_time()
        for k in range(0, len(views), batch_size):
            collate([(tensors[j], rows[j], views[j][0].label) for j in range(k, min(k + batch_size, len(views)))])
        clock("collate", len(views), t0)
    return best


def _torch_stages(recipe, samples, views, boxes, clock) -> list[torch.Tensor]:
    """v3: the crop is a view of the decoded tensor; torch resizes it (uint8, antialiased)."""
    t0 = time.process_time()
    crops = [x.image[:, t:t + h, left:left + w] for (x, _, _), (t, left, h, w) in zip(views, boxes, strict=True)]
    clock("crop (a view of the tensor)", len(views), t0)
    t0 = time.process_time()
    tensors = [resize_tensor(c, recipe.image_size, recipe.image_size, recipe.torch_mode) for c in crops]
    clock("resize (torch uint8, antialiased)", len(views), t0)
    return tensors


def _pillow_stages(recipe, samples, views, boxes, clock) -> list[torch.Tensor]:
    """v1/v2: the crop goes into PIL (from the tensor, or cut from the image converted once), Pillow resizes."""
    t0 = time.process_time()
    ims = [_to_pil(x.image[:, t:t + h, left:left + w]) for (x, _, _), (t, left, h, w) in zip(views, boxes,
                                                                                            strict=True)]
    clock("crop to PIL", len(views), t0)
    t0 = time.process_time()
    sources = {id(x): view_source(x.image, recipe, CACHED_EPOCHS) for _, x in samples}
    clock("image to PIL once (N >= 3, per image)", len(samples), t0)
    t0 = time.process_time()
    for (x, _, _), (t, left, h, w) in zip(views, boxes, strict=True):
        sources[id(x)].crop((left, t, left + w, t + h))
    clock("crop of it (N >= 3, per view)", len(views), t0)
    t0 = time.process_time()
    ims = [im.resize((recipe.image_size,) * 2, recipe.resample) for im in ims]
    clock("resize (Pillow, antialiased)", len(views), t0)
    t0 = time.process_time()
    tensors = [_from_pil(im) for im in ims]
    clock("PIL to tensor", len(views), t0)
    return tensors


def median_ratio(rates: list[float], base: list[float]) -> float:
    """The median over rounds of rates[r] / base[r]."""
    return float(np.median([a / b for a, b in zip(rates, base, strict=True)]))


class _Tiny224(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.patch(x)).mean((2, 3)))


def e2e(data: str, cache: str, recipe: str, root: str, workers: int, epochs: int, repeats: int) -> dict:
    """images/s of training (views per second of the logged epochs' training time) for CE N=1 and NKD N=4."""
    LOCAL_MODELS["tiny224"] = ModelSpec("tiny224", "logitcache", 224, IMAGENET_MEAN, IMAGENET_STD, None, None,
                                        lambda nc, _: _Tiny224(nc))
    runs = {"ce, N=1": dict(loss="ce", recipe=recipe, image_size=224, views_per_decode=1),
            "nkd cached, N=4": dict(loss="nkd", cache=cache, views_per_decode=4)}
    best: dict[str, float] = {}
    for r in range(repeats):
        for name, kw in runs.items():
            out = os.path.join(root, f"run-{r}-{name.split(',')[0].replace(' ', '-')}")
            train(TrainConfig(data=data, out=out, student="tiny224", epochs=epochs, batch_size=32, lr=0.01,
                              workers=workers, progress=False, **kw))
            lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
            rate = sum(m["train"]["samples"] for m in lines) / sum(m["train"]["seconds"] for m in lines)
            best[name] = max(best.get(name, 0.0), rate)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="also the cost of each step of the replay path")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end training comparison")
    ap.add_argument("--e2e-workers", type=int, default=1)
    ap.add_argument("--e2e-epochs", type=int, default=8)
    ap.add_argument("--recipe", default="imagenet", help="the view recipe (default: the newest imagenet)")
    ap.add_argument("--compare-recipe", default=None,
                    help="also replay a cache of this recipe at N = 1 and 4 in the same rounds (e.g. imagenet@2)")
    ap.add_argument("--json", action="store_true", help="JSON summary on stdout only")
    args = ap.parse_args(argv)
    log = sys.stderr if args.json else sys.stdout
    torch.set_num_threads(1)  # per core
    with tempfile.TemporaryDirectory(prefix="bench_vpd_") as root:
        data, kb = make_data(root, args.images, args.per_shard)
        cache = make_cache(root, data, args.recipe)
        other = make_cache(root, data, args.compare_recipe) if args.compare_recipe else None
        other_rounds: dict[int, list[float]] = {1: [], 4: []}
        replay_rate(data, cache, 1, args.batch_size)  # warm-up (page cache, lazy imports)
        replay: dict[int, float] = {}  # views per CPU second: per core, whatever else the machine runs
        dumping: dict[int, float] = {}
        replay_wall: dict[int, float] = {}
        dumping_wall: dict[int, float] = {}
        rounds: dict[int, list[float]] = {n: [] for n in (1, 2, 4, 8)}  # each round's own ratio to its N = 1
        for _ in range(args.repeats):
            for n in (1, 2, 4, 8):
                cpu, wall = replay_rate(data, cache, n, args.batch_size)
                rounds[n].append(cpu)
                replay[n], replay_wall[n] = max(replay.get(n, 0.0), cpu), max(replay_wall.get(n, 0.0), wall)
                cpu, wall = dump_rate(data, args.recipe, n, args.batch_size)
                dumping[n], dumping_wall[n] = max(dumping.get(n, 0.0), cpu), max(dumping_wall.get(n, 0.0), wall)
                if other is not None and n in other_rounds:
                    other_rounds[n].append(replay_rate(data, other, n, args.batch_size)[0])
        stages = stage_costs(data, cache, args.batch_size, args.repeats) if args.stages else {}
        e2e_rates = e2e(data, cache, args.recipe, root, args.e2e_workers, args.e2e_epochs,
                        args.repeats) if args.e2e else {}
    recipe = get_recipe(args.recipe, 224)
    summary = {
        "benchmark": "views_per_decode", "images": args.images, "mean_jpeg_kb": kb, "image_size": 224,
        "recipe": f"{recipe.name}@{recipe.version}", "interpolation": recipe.interpolation,
        "replay_views_per_s_one_core": {str(n): round(v, 1) for n, v in replay.items()},
        "replay_ratio_to_n1": {str(n): round(v / replay[1], 3) for n, v in replay.items()},
        "replay_ratio_median_of_rounds": {str(n): round(median_ratio(rounds[n], rounds[1]), 3) for n in rounds},
        "dump_views_per_s_one_core": {str(n): round(v, 1) for n, v in dumping.items()},
        "dump_ratio_to_e1": {str(n): round(v / dumping[1], 3) for n, v in dumping.items()},
        "replay_views_per_wall_s": {str(n): round(v, 1) for n, v in replay_wall.items()},
        "replay_wall_ratio_to_n1": {str(n): round(v / replay_wall[1], 3) for n, v in replay_wall.items()},
        "dump_views_per_wall_s": {str(n): round(v, 1) for n, v in dumping_wall.items()},
        "target_replay_ratio_n4": 2.0,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
    }
    if other is not None:
        summary["compare"] = {
            "recipe": args.compare_recipe,
            "replay_views_per_s_one_core": {str(n): round(max(v), 1) for n, v in other_rounds.items()},
            "n1_ratio_median_of_rounds": round(median_ratio(rounds[1], other_rounds[1]), 3),
            "n4_ratio_median_of_rounds": round(median_ratio(rounds[4], other_rounds[4]), 3),
            "its_n4_over_n1_median_of_rounds": round(median_ratio(other_rounds[4], other_rounds[1]), 3)}
    if stages:
        summary["stages_cpu_ms"] = {k: round(v, 4) for k, v in stages.items()}
    if e2e_rates:
        summary.update({"e2e_images_per_s": {k: round(v, 1) for k, v in e2e_rates.items()},
                        "e2e_ratio_nkd_n4_over_ce_n1": e2e_rates["nkd cached, N=4"] / e2e_rates["ce, N=1"],
                        "e2e_workers": args.e2e_workers, "target_e2e_ratio": 1.5})
    print(f"{args.images} synthetic photos, mean JPEG {kb:.0f} kB, 224 px views; {os.cpu_count()} CPUs, load average "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}, torch {torch.__version__}; recipe "
          f"{summary['recipe']} ({recipe.interpolation})", file=log)
    for n in (1, 2, 4, 8):
        print(f"replay  N={n}: {replay[n]:7.1f} views/CPU-s  x{replay[n] / replay[1]:.2f}  "
              f"(wall: {replay_wall[n]:6.1f}/s x{replay_wall[n] / replay_wall[1]:.2f})     "
              f"dump data path E={n}: {dumping[n]:7.1f} views/CPU-s  "
              f"x{dumping[n] / dumping[1]:.2f}", file=log)
    print("replay ratio to N=1, median over rounds: " + "  ".join(
        f"N={n} x{median_ratio(rounds[n], rounds[1]):.2f}" for n in (2, 4, 8)), file=log)
    print(f"target: replay N=4 / N=1 >= 2.0 -> {replay[4] / replay[1]:.2f} (best rounds), "
          f"{median_ratio(rounds[4], rounds[1]):.2f} (median of rounds)", file=log)
    if other is not None:
        c = summary["compare"]
        print(f"{args.compare_recipe} in the same rounds: N=1 {c['replay_views_per_s_one_core']['1']:.1f}, N=4 "
              f"{c['replay_views_per_s_one_core']['4']:.1f} views/CPU-s (its N=4 / N=1 x"
              f"{c['its_n4_over_n1_median_of_rounds']:.2f}); {summary['recipe']} / {args.compare_recipe}: N=1 x"
              f"{c['n1_ratio_median_of_rounds']:.2f}, N=4 x{c['n4_ratio_median_of_rounds']:.2f} (median of rounds)",
              file=log)
    for k, v in stages.items():
        print(f"  {k:30s} {v:6.3f} CPU-ms per {'image' if 'image' in k else 'view'}", file=log)
    if e2e_rates:
        for k, v in e2e_rates.items():
            print(f"train {k:16s} {v:7.1f} images/s ({args.e2e_workers} worker(s), tiny224 student)", file=log)
        print(f"target: nkd N=4 / ce N=1 >= 1.5 -> {summary['e2e_ratio_nkd_n4_over_ce_n1']:.2f}", file=log)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
