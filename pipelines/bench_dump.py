"""Dump overhead: wall time of `logitcache dump` ÷ wall time of bare teacher inference over the same views
with the same loader (target ≤ 1.05). Both runs build the teacher, read the same synthetic ImageNet-sized JPEG
shards through the same `UnitViews` loader and run the same forward passes; the dump also keeps the top-k,
compresses and writes units (format 2, the default). Runs alternate (bare, dump, bare, dump, ...) and the best of
each is compared, in wall time and in CPU time (this process and its loader workers: on a shared machine the
CPU-time ratio is the steadier figure).

    .venv/bin/python pipelines/bench_dump.py [--teacher resnet34 --image-size 112 --views 1024] [--json]

Peak memory vs --epochs (issue 14, ``--rss``): the same dump at ``--epochs`` 1, 10 and 100 over the same
shards (--rss-views ImageNet-sized JPEGs in one shard, the imagenet recipe at --rss-image-size, batch
--rss-batch-size, 0 loader workers so everything runs in one process), each in a child process whose peak RSS
(``ru_maxrss`` from ``wait4``) is read when it ends. Claim: the largest ≤ 1.15 × the smallest. The dump decodes a
chunk of batch-size samples and emits that chunk's batch for each epoch in turn, so it holds one chunk of
decoded images and one batch of views whatever the number of epochs; what grows is the teacher rows of a
shard's pending units (epochs × shard length rows, ~150 bytes each at k = 10).

    .venv/bin/python pipelines/bench_dump.py --rss             # about 4 minutes on 2 busy cores

On a loaded machine both arms' wall (and CPU) times wander by tens of percent between runs; ``--profile`` runs
the dump once under cProfile and reports the time its own stages (labels, unit writes, cache open/close) take,
as the estimate total / (total - own):

    .venv/bin/python pipelines/bench_dump.py --profile

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


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the DataLoader workers, joined at the end
    of each run): less disturbed than wall time by other processes on a shared machine."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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


def dump_peak_rss(data: str, out: str, epochs: int, args) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of one `logitcache dump` in a child process (its ru_maxrss from wait4)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "logitcache.cli", "dump", "--data", data, "--out", out, "--teacher", args.rss_teacher,
           "--recipe", "imagenet", "--image-size", str(args.rss_image_size), "--epochs", str(epochs),
           "--batch-size", str(args.rss_batch_size), "--workers", "0", "--topk", str(args.topk), "--json"]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"dump --epochs {epochs} failed:\n{err.read().decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def rss_vs_epochs(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(f"{tmp}/shards", args.rss_views, args.rss_views)
        rows = []
        for e in args.rss_epochs:
            rss, seconds = dump_peak_rss(f"{tmp}/shards", f"{tmp}/cache-e{e}.zarr", e, args)
            rows.append({"epochs": e, "peak_rss_mib": rss, "seconds": seconds, "views": e * args.rss_views})
    peaks = [r["peak_rss_mib"] for r in rows]
    return {"benchmark": "dump_peak_rss_vs_epochs", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "teacher": args.rss_teacher, "image_size": args.rss_image_size, "batch_size": args.rss_batch_size,
            "samples": args.rss_views, "workers": 0, "rows": rows, "largest_over_smallest": max(peaks) / min(peaks)}


#: the dump's own stages (what bare inference does not do): labels, unit writes, cache open/close
OWN_STAGES = ("soft_labels", "calibrate_prior", "open_writer", "start_run", "forget_damaged_units", "_write_unit",
              "finish_indexes", "finish_run", "summarize")


def profile_overhead(args) -> dict:
    """The dump under cProfile: the share of its time spent in its own stages (`OWN_STAGES`), as the overhead
    estimate total / (total - own). Steadier than wall or CPU time on a loaded machine (both arms of those
    wander by tens of percent there); cProfile slows the Python-heavy own stages more than the teacher's
    kernels, so the estimate errs high."""
    import cProfile
    import pstats

    from logitcache.dump import DumpConfig, dump

    with tempfile.TemporaryDirectory() as tmp:
        make_shards(f"{tmp}/shards", args.views, args.per_shard)
        cfg = DumpConfig(data=f"{tmp}/shards", out=f"{tmp}/cache.zarr", teacher=args.teacher, recipe="imagenet",
                         image_size=args.image_size, epochs=1, topk=args.topk, batch_size=args.batch_size,
                         workers=0, progress=False)
        prof = cProfile.Profile()
        prof.enable()
        dump(cfg)
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    own = {name: sum(v[3] for (f, _, n), v in stats.items() if n == name and "logitcache" in f)
           for name in OWN_STAGES}  # top-level stages of `dump` (none calls another)
    total = sum(v[3] for (f, _, n), v in stats.items() if n == "dump" and f.endswith("logitcache/dump.py"))
    own_s = sum(own.values())
    return {"benchmark": "dump_overhead_profile", "date": time.strftime("%Y-%m-%d"), "teacher": args.teacher,
            "image_size": args.image_size, "views": args.views, "topk": args.topk, "workers": 0,
            "total_seconds": total, "own_seconds": own_s, "own_by_stage": own,
            "overhead_estimate": total / (total - own_s), "loadavg_1min": os.getloadavg()[0]}


def summary_format(url: str) -> str:
    from logitcache.cache.reader import CacheReader

    r = CacheReader(url)
    return f"{'.'.join(map(str, r.root_meta.format_version))} ({r.codec_name})"


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
    ap.add_argument("--rss", action="store_true", help="only the peak-RSS-vs-epochs figure (see above)")
    ap.add_argument("--rss-epochs", type=lambda v: [int(x) for x in v.split(",")], default=[1, 10, 100])
    ap.add_argument("--rss-views", type=int, default=128, help="samples in the one shard of the RSS figure")
    ap.add_argument("--rss-image-size", type=int, default=112)
    ap.add_argument("--rss-batch-size", type=int, default=128)
    ap.add_argument("--rss-teacher", default="smallcnn", help="the figure is memory, not compute: a cheap teacher")
    ap.add_argument("--profile", action="store_true", help="only the profile-based overhead estimate (see above)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.profile:
        result = profile_overhead(args)
        if args.json:
            print(json.dumps(result, indent=1))
            return result
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result["own_by_stage"].items() if v)
        print(f"dump of {args.views} views, {args.teacher} at {args.image_size} px, k={args.topk}, 0 workers, under "
              f"cProfile: {result['total_seconds']:.1f} s, of which its own stages {result['own_seconds']:.2f} s "
              f"({stages})")
        print(f"overhead estimate total / (total - own) = {result['overhead_estimate']:.3f} (target <= 1.05); load "
              f"{result['loadavg_1min']:.1f}")
        return result
    if args.rss:
        result = rss_vs_epochs(args)
        if args.json:
            print(json.dumps(result, indent=1))
            return result
        print(f"dump peak RSS vs --epochs: {args.rss_views} ImageNet-sized JPEGs in one shard, imagenet recipe at "
              f"{args.rss_image_size} px, batch {args.rss_batch_size}, teacher {args.rss_teacher}, 0 workers")
        for r in result["rows"]:
            print(f"  --epochs {r['epochs']:4d}: {r['views']:6d} views, peak RSS {r['peak_rss_mib']:7.0f} MiB "
                  f"({r['seconds']:.0f} s)")
        ratio = result["largest_over_smallest"]
        print(f"largest / smallest peak RSS = {ratio:.3f}  (claim: <= 1.15: {'OK' if ratio <= 1.15 else 'NOT MET'})")
        return result
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(f"{tmp}/shards", args.views, args.per_shard)
        times = {"bare": [], "dump": []}
        cpu = {"bare": [], "dump": []}
        for r in range(args.repeats):
            cfg = DumpConfig(data=f"{tmp}/shards", out=f"{tmp}/cache{r}.zarr", teacher=args.teacher, recipe="imagenet",
                             image_size=args.image_size, epochs=1, topk=args.topk, batch_size=args.batch_size,
                             workers=args.workers, progress=False)
            c0 = cpu_seconds()
            times["bare"].append(bare_inference(cfg))
            c1 = cpu_seconds()
            t0 = time.perf_counter()
            summary = dump(cfg)
            times["dump"].append(time.perf_counter() - t0)
            cpu["bare"].append(c1 - c0)
            cpu["dump"].append(cpu_seconds() - c1)
            fmt = summary_format(summary.cache)
    best_bare, best_dump = min(times["bare"]), min(times["dump"])
    result = {
        "benchmark": "dump_overhead", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "teacher": args.teacher, "image_size": args.image_size, "views": args.views, "topk": args.topk,
        "workers": args.workers, "bare_seconds": times["bare"], "dump_seconds": times["dump"],
        "bare_views_per_s": args.views / best_bare, "dump_views_per_s": args.views / best_dump,
        "overhead_ratio": best_dump / best_bare, "bytes_per_view": summary.bytes_per_view,
        "bare_cpu_seconds": cpu["bare"], "dump_cpu_seconds": cpu["dump"],
        "overhead_ratio_cpu": min(cpu["dump"]) / min(cpu["bare"]), "cache_format": fmt,
        "loadavg_1min": os.getloadavg()[0],
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
        print(f"dump / bare CPU time:   {result['overhead_ratio_cpu']:.3f}  (runs: bare {cpu['bare']}, dump "
              f"{cpu['dump']} CPU s; process + loader workers); cache format {result['cache_format']}; load "
              f"{result['loadavg_1min']:.1f}")
    return result


if __name__ == "__main__":
    main()
