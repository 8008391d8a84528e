"""Accuracy cost of `--views-per-decode` (issue 17) on Fashion-MNIST: NKD students from one cache of 3 cached
epochs, N = 1 (three passes of one epoch) vs N = 3 (one pass of three epochs): the same views, the same number of
optimizer steps, only the order differs (with N = 3 each image's three views sit in three nearby batches).

The demo's student settings: `smallcnn`, SGD lr 0.1, warm-up 0.2 epochs, weight decay 5e-4, batch 128, cosine,
3 epochs, one loader worker; each seed changes the initialisation and the data order. Top-1 on the test set
after the last epoch; prints mean ± std per N, the difference of the means, the seeds' spread and the per-seed
(paired: same initialisation) differences.

    .venv/bin/python pipelines/fmnist_views_per_decode.py --data runs/demo/data --cache runs/demo/cache.zarr \\
        [--shards 0-29] [--seeds 0,1,2] [--out runs/vpd]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from logitcache.data.manifest import load_manifest
from logitcache.data.split import parse_shard_selection
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Fashion-MNIST shards with train/ and test/ (the demo's)")
    ap.add_argument("--cache", required=True, help="a cache of 3 epochs over (a subset of) train/")
    ap.add_argument("--shards", default=None, help="training shards, e.g. 0-29 (the cache's)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/vpd")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    train_dir, test_dir = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    shards = (tuple(parse_shard_selection(args.shards, len(load_manifest(train_dir).shards)))
              if args.shards else None)
    seeds = [int(s) for s in args.seeds.split(",")]
    top1: dict[int, list[float]] = {1: [], 3: []}
    seconds: dict[int, list[float]] = {1: [], 3: []}
    for seed in seeds:
        for n in (1, 3):
            out = os.path.join(args.out, f"nkd-n{n}-seed{seed}")
            metrics = os.path.join(out, "metrics.jsonl")
            if not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) == 3):
                t0 = time.time()
                train(TrainConfig(data=train_dir, val=test_dir, out=out, student="smallcnn", loss="nkd",
                                  cache=args.cache, epochs=3, batch_size=128, lr=0.1, warmup_epochs=0.2,
                                  weight_decay=5e-4, workers=args.workers, seed=seed, shards=shards,
                                  views_per_decode=n, progress=False, resume=os.path.exists(out)))
                print(f"N={n} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            lines = [json.loads(x) for x in open(metrics)]
            top1[n].append(lines[-1]["val"]["top1"])
            seconds[n].append(sum(m["train"]["seconds"] for m in lines))
    summary = {
        "seeds": seeds, "shards": args.shards, "cache": args.cache,
        "top1": {str(n): v for n, v in top1.items()},
        "mean": {str(n): statistics.mean(v) for n, v in top1.items()},
        "std": {str(n): statistics.stdev(v) if len(v) > 1 else float("nan") for n, v in top1.items()},
        "train_seconds": {str(n): v for n, v in seconds.items()},
    }
    diff = summary["mean"]["3"] - summary["mean"]["1"]
    noise = max(summary["std"]["1"], summary["std"]["3"])
    paired = [b - a for a, b in zip(top1[1], top1[3], strict=True)]  # same seed: same initialisation
    summary.update({"difference_n3_minus_n1": diff, "seed_std_max": noise, "paired_differences": paired,
                    "paired_difference_std": statistics.stdev(paired) if len(paired) > 1 else float("nan"),
                    "within_seed_noise": bool(abs(diff) <= 2 * noise) if noise == noise else None})
    for n in (1, 3):
        print(f"NKD N={n}: test top-1 {100 * summary['mean'][str(n)]:.2f} ± {100 * summary['std'][str(n)]:.2f} % "
              f"(seeds {seeds}: {', '.join(f'{100 * t:.2f}' for t in top1[n])})")
    print(f"difference N=3 - N=1: {100 * diff:+.2f} points; seed std (larger of the two) {100 * noise:.2f} points "
          f"-> {'within' if summary['within_seed_noise'] else 'outside'} 2 std of seed noise")
    print(f"per seed (same initialisation), N=3 - N=1: {', '.join(f'{100 * d:+.2f}' for d in paired)} points; "
          f"std of the paired differences {100 * summary['paired_difference_std']:.2f} points")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
