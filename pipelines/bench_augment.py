"""Benchmark: the ``deit`` recipe's augmentation, images/s on ONE core, ours vs timm's pipeline (issue 15).

Both sides do the same work per image on the same synthetic ImageNet-size JPEGs (about 500x375, photo-like,
quality 90): decode to RGB, RandomResizedCrop(224, 0.08-1, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 +
RandomErasing(0.25, pixel noise), then Mixup 0.8 / CutMix 1.0 (switch 0.5) with a partner view.

    timm    PIL decode -> timm.data.create_transform(224, is_training=True, auto_augment=..., interpolation=
            "bicubic", re_prob=0.25, re_mode="pixel") -> float tensors, then timm Mixup(mode="elem") per 16
    ours    torchvision.io decode (the shards' decoder) -> UnitMixer(deit): sample_view(view_rng(...)) +
            apply_view + the partner mix inside blocks of 16 -> uint8 (3, 224, 224)

torch and PIL single-threaded, interleaved rounds, best of --repeats, global RNGs seeded. Target: ours / timm
>= 0.9. timm raises on ~0.15 % of images (PosterizeIncreasing at magnitude 10 asks Pillow >= 12 for 0 bits); the
bench redraws that image's transform, as a training loop would have to.

    .venv/bin/python pipelines/bench_augment.py [--images 128] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import time

import numpy as np
import torch
from PIL import Image


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (375, 500) if rng.random() < 0.7 else (int(rng.integers(300, 520)), int(rng.integers(300, 520)))
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        im = np.clip(im + rng.integers(-12, 13, im.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _Sample:
    __slots__ = ("offset", "index", "image", "label", "where")

    def __init__(self, offset, image):
        self.offset, self.index, self.image, self.label, self.where = offset, offset, image, offset % 1000, "bench"


def run_ours(jpegs: list[bytes], epoch: int) -> int:
    from logitcache.data.decode import decode_image
    from logitcache.views.mixing import UnitMixer
    from logitcache.views.recipe import get_recipe

    mixer = UnitMixer(get_recipe("deit", 224), seed=0, epoch=epoch, shard=0, length=len(jpegs))
    n = 0
    for i, data in enumerate(jpegs):
        n += len(mixer.push(_Sample(i, decode_image(data))))
    return n + len(mixer.finish())


def make_timm():
    from timm.data import Mixup, create_transform

    tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                          re_prob=0.25, re_mode="pixel", re_count=1)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="elem", label_smoothing=0.1,
                  num_classes=1000)
    return tf, mixup


def run_timm(jpegs: list[bytes], tf, mixup) -> int:
    n, batch = 0, []
    for i, data in enumerate(jpegs):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for _ in range(10):
            try:
                batch.append(tf(img))
                break
            except ValueError:  # timm's PosterizeIncreasing at magnitude 10 asks Pillow >= 12 for 0 bits: redraw
                continue
        if len(batch) == 16 or i == len(jpegs) - 1:
            x = torch.stack(batch)
            if len(batch) % 2 == 0:  # timm's Mixup needs an even batch
                mixup(x, torch.arange(len(batch)) % 1000)
            n += len(batch)
            batch = []
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(0)  # timm draws from the global RNGs
    np.random.seed(0)
    torch.manual_seed(0)
    jpegs = make_jpegs(args.images)
    tf, mixup = make_timm()
    best = {"ours": 0.0, "timm": 0.0}
    for r in range(args.repeats):
        for name in ("timm", "ours") if r % 2 else ("ours", "timm"):
            t0 = time.perf_counter()
            n = run_ours(jpegs, r) if name == "ours" else run_timm(jpegs, tf, mixup)
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    import PIL
    import timm
    import torchvision

    result = {"images": args.images, "repeats": args.repeats, "images_per_s_per_core": best,
              "ratio_ours_over_timm": best["ours"] / best["timm"], "target": ">= 0.9",
              "versions": {"timm": timm.__version__, "torchvision": torchvision.__version__,
                           "pillow": PIL.__version__, "torch": torch.__version__},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"deit augmentation, one core, {args.images} ImageNet-size JPEGs, best of {args.repeats}:")
    print(f"  timm create_transform + Mixup   {best['timm']:7.1f} img/s")
    print(f"  ours (UnitMixer, deit)          {best['ours']:7.1f} img/s")
    print(f"  ratio ours / timm               {result['ratio_ours_over_timm']:7.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
