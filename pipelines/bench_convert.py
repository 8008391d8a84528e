"""Benchmark: conversion speed-up with --workers (shards folder, shards scan), this machine as it is.

Writes an ImageNet-like ImageFolder tree of synthetic JPEGs (photo-like, ~110 kB at 500x375 as in
bench_data.py), then times, best of --repeats interleaved rounds:

    shards folder --workers 1 / --workers N    read, sniff, tar and sha256 every image (write_image_folder)
    shards scan   --workers 1 / --workers N    read, sha256 and key-digest every shard (build_manifest)

and checks that the outputs are identical whatever the worker count. Prints images/s, the speed-ups, the CPU
time per image (this process + its worker processes: parallel work should not cost more CPU) and the load
average: on a machine whose cores are busy with other work, N workers cannot run N times faster.

    .venv/bin/python pipelines/bench_convert.py                  # table
    .venv/bin/python pipelines/bench_convert.py --json           # JSON summary on stdout only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

from bench_data import synthetic_jpegs

from logitcache.data.convert.folder import write_image_folder
from logitcache.data.convert.scan import build_manifest, expand_sources


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="JSON summary on stdout, nothing else")
    args = ap.parse_args(argv)
    log = sys.stderr if args.json else sys.stdout

    tmp = tempfile.TemporaryDirectory(prefix="bench_convert_")
    src = os.path.join(tmp.name, "train")
    blobs = synthetic_jpegs(min(args.images, 64))
    for i in range(args.images):  # 64 distinct images, repeated: the work per byte is the same
        d = os.path.join(src, f"n{i % args.classes:08d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(blobs[i % len(blobs)])
    total_mb = sum(len(blobs[i % len(blobs)]) for i in range(args.images)) / 1e6

    def folder(workers: int):
        def run():
            out = os.path.join(tmp.name, f"shards-w{workers}")
            return write_image_folder(src, out, samples_per_shard=args.samples_per_shard, overwrite=True,
                                      workers=workers)
        return run

    def scan(workers: int):
        def run():
            urls = expand_sources(os.path.join(tmp.name, "shards-w1"))
            return build_manifest(urls, base_url=os.path.join(tmp.name, "shards-w1"), workers=workers)
        return run

    contenders = {
        "folder, 1 worker": folder(1), f"folder, {args.workers} workers": folder(args.workers),
        "scan, 1 worker": scan(1), f"scan, {args.workers} workers": scan(args.workers),
    }
    results = {name: fn() for name, fn in contenders.items()}  # warm-up (page cache), and the outputs
    same_folder = results["folder, 1 worker"] == results[f"folder, {args.workers} workers"]
    same_scan = results["scan, 1 worker"] == results[f"scan, {args.workers} workers"]
    def cpu_seconds() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    best: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start, cpu0 = time.perf_counter(), cpu_seconds()
            fn()
            best[name] = max(best.get(name, 0.0), args.images / (time.perf_counter() - start))
            cpu = (cpu_seconds() - cpu0) * 1e3 / args.images
            cpu_ms[name] = min(cpu_ms.get(name, cpu), cpu)
    summary = {
        "images": args.images, "megabytes": round(total_mb, 1), "workers": args.workers,
        "cpu_count": os.cpu_count(), "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "speedup_folder": best[f"folder, {args.workers} workers"] / best["folder, 1 worker"],
        "speedup_scan": best[f"scan, {args.workers} workers"] / best["scan, 1 worker"],
        "same_output_folder": same_folder, "same_output_scan": same_scan,
        "cpu_ms_per_image": {k: round(v, 3) for k, v in cpu_ms.items()},
        "load_average_1min": os.getloadavg()[0],
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
    }
    for name, v in best.items():
        print(f"{name:22s} {v:8.1f} images/s  ({v * total_mb / args.images:6.1f} MB/s)  "
              f"CPU {cpu_ms[name]:.3f} ms/image", file=log)
    print(f"speed-up at {args.workers} workers: folder {summary['speedup_folder']:.2f}x, scan "
          f"{summary['speedup_scan']:.2f}x; same output: folder {same_folder}, scan {same_scan} "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})", file=log)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    tmp.cleanup()
    return 0 if same_folder and same_scan else 1


if __name__ == "__main__":
    sys.exit(main())
