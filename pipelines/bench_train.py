"""Benchmark: what caching buys in the training loop — cached NKD vs plain CE, and online NKD vs cached NKD.

Issue 6's figures, each a ratio of two figures measured in this run on this machine (CONTRACTS §7):

(a) cached NKD training throughput ÷ plain CE training throughput, same student, same DataLoader settings,
    target >= 0.95. CE trains teacher-free on freshly drawn views (`FreshViews`); cached NKD replays the
    cache's views and reads the teacher's top-k rows (`CachedViews`) and adds the NKD terms. Two settings:
      small     Fashion-MNIST style: smallcnn student at 28 px on the first --small-images real Fashion-MNIST
                training images (synthetic 28 px PNGs when the IDX files are absent), teacher smallcnn_wide;
      imagenet  resnet18 student at 112 px on synthetic ImageNet-sized JPEGs (about 500x375, 1000 classes,
                written into a temporary directory), teacher resnet34.
(b) online NKD ÷ cached NKD training wall time for resnet34 -> resnet18 at 112 px (the imagenet setting),
    next to the ideal ``(t_teacher + t_student) / t_student`` measured in the same run on synthetic tensors of
    the same batch: t_teacher = the teacher forward per batch (`Teacher.logits`, what the online loop
    calls), t_student = one student training step (forward, the NKD terms from a top-k row, backward, SGD),
    each the fastest of 8 interleaved repeats.
    Fraction of the ideal reached = measured ratio ÷ ideal, target >= 0.90. The ideal leaves data loading
    out; the data-inclusive ideal ``(t_data + t_teacher + t_student) / (t_data + t_student)`` is printed too,
    with t_data = the DataLoader alone per batch, because on a 2-core machine decoding JPEGs is not free.
(c) host–device synchronisations per training step (issue 14): one more epoch of each run under
    `logitcache.train.syncs.SyncCounter`, which counts every call that makes the host wait for the device
    (``item``/``float``/``bool``/``tolist``/``cpu``/``numpy``, blocking copies,
    ``nonzero``, ``torch.cuda.synchronize``, ``torch.distributed`` collectives) made in the step's hot path,
    and separately those of the progress display every LOG_EVERY steps. Target: 0 per step for CE and cached
    NKD. The calls are counted whatever the device, so the CPU figure is the one a GPU run would show.

Every training figure comes from the real loop, ``logitcache.train.train(TrainConfig(...))``, one epoch per run
(its ``train.seconds`` / ``train.images_per_s``: the epoch's loop, data loading included, no validation),
after an untimed warm-up run of each kind. The runs are interleaved over --rounds rounds and the best round of
each kind is used (the machine is shared: the least disturbed round is the most faithful); every round is in
the JSON. Teachers are randomly initialised (seeded): compute cost does not depend on the weights.

    .venv/bin/python pipelines/bench_train.py                 # a few minutes on 2 cores; table on stdout
    .venv/bin/python pipelines/bench_train.py --json          # JSON summary on stdout, the table on stderr
    .venv/bin/python pipelines/bench_train.py --smoke         # seconds: tiny sizes, checks the script runs
    .venv/bin/python pipelines/bench_train.py --syncs-only    # only (c), the step profile: tens of seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision

from logitcache.data.convert.fashion_mnist import FASHION_MNIST_CLASSES
from logitcache.data.manifest import load_manifest
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, dump
from logitcache.labels.topk import TopKLogits
from logitcache.losses import get_loss, parse_loss_args
from logitcache.models.zoo import build_model, model_normalization
from logitcache.replay import CachedViews, FreshViews, collate
from logitcache.teacher import Teacher
from logitcache.train.config import TrainConfig, make_optimizer
from logitcache.train.loop import LOG_EVERY, train
from logitcache.train.syncs import SyncCounter
from logitcache.views.recipe import get_recipe

FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist/"
TARGET_THROUGHPUT_RATIO = 0.95
TARGET_FRACTION_OF_IDEAL = 0.90
#: the runs whose step must not wait for the device (issue 14)
ZERO_SYNC_RUNS = ("ce", "nkd_cached")


# ------------------------------------------------------------------ data
def write_small_data(out: Path, n: int, per_shard: int, src: str = FASHION_MNIST_SRC) -> str:
    """The first `n` Fashion-MNIST training images as shards (synthetic 28 px PNGs without the IDX files)."""
    if os.path.exists(os.path.join(src, "train-images-idx3-ubyte.gz")):
        from logitcache.data.convert.fashion_mnist import fashion_mnist_samples

        samples = itertools.islice(fashion_mnist_samples(src, "train"), n)
        source = f"Fashion-MNIST train[:{n}] ({src})"
    else:
        import io

        from PIL import Image

        rng = np.random.default_rng(0)

        def synthetic():
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
                yield f"s{i:06d}", {"png": buf.getvalue(), "cls": str(i % 10).encode()}

        samples, source = synthetic(), f"{n} synthetic 28x28 PNGs (no Fashion-MNIST at {src})"
    write_shards(samples, out, class_names=FASHION_MNIST_CLASSES, samples_per_shard=per_shard)
    return source


def write_imagenet_data(out: Path, n: int, per_shard: int) -> str:
    """`n` synthetic ImageNet-sized JPEGs (bench_data's generator: ~500x375, photo-like, quality 90)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_data import synthetic_jpegs

    blobs = synthetic_jpegs(n)
    samples = ((f"{i:06d}", {"jpg": b, "cls": str(i % 1000).encode()}) for i, b in enumerate(blobs))
    write_shards(samples, out, class_names=[f"n{i:08d}" for i in range(1000)], samples_per_shard=per_shard)
    return f"{n} synthetic JPEGs, mean {sum(map(len, blobs)) / n / 1000:.0f} kB, 1000 classes"


# ------------------------------------------------------------------ timing helpers
def _times_s(fn: Callable[[], None], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def train_epoch(runs_dir: Path, name: str, **kw) -> dict:
    """One epoch of the real loop, no validation, in a fresh run directory; returns its train figures."""
    out = runs_dir / f"{name}-{len(list(runs_dir.glob(name + '-*')))}"
    line = train(TrainConfig(out=str(out), epochs=1, progress=False, **kw))
    return {"seconds": line["train"]["seconds"], "images_per_s": line["train"]["images_per_s"],
            "samples": line["train"]["samples"]}


def sync_profile(runs_dir: Path, name: str, **kw) -> dict:
    """One epoch of the real loop under `SyncCounter`: syncs per step in the hot path (by call) and at the
    display every LOG_EVERY steps."""
    out = runs_dir / f"{name}-{len(list(runs_dir.glob(name + '-*')))}"
    with SyncCounter() as counter:
        train(TrainConfig(out=str(out), epochs=1, progress=False, **kw))
    steps = max(counter.steps, 1)
    return {"steps": counter.steps, "hot_path_syncs": counter.total, "hot_path_per_step": counter.total / steps,
            "hot_path_by_call": dict(counter.counts), "display_syncs": sum(counter.other.values()),
            "display_per_step": sum(counter.other.values()) / steps, "display_by_call": dict(counter.other)}


def loader_seconds_per_batch(dataset, batch_size: int, workers: int) -> float:
    """The DataLoader alone (decode, view, cache rows, collate), as the loop builds it: seconds per batch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    return (time.perf_counter() - start) / max(batches, 1)


def step_times(student: str, teacher: str, num_classes: int, image_size: int, batch: int, k: int,
               repeats: int) -> dict[str, float]:
    """t_teacher (teacher_logits on a uint8 batch) and t_student (one NKD training step from a top-k row)."""
    recipe_size = image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, recipe_size, recipe_size), dtype=torch.uint8, generator=g)
    target = torch.randint(0, num_classes, (batch,), generator=g)
    t_model = Teacher.load(teacher, None, num_classes, image_size, "cpu", 0)

    def teacher_forward() -> None:
        with torch.no_grad():  # as the online loop calls it
            t_model.logits(images)

    torch.manual_seed(0)
    s_model = build_model(student, num_classes, image_size=image_size).train()
    cfg = TrainConfig(data="-", out="-", student=student, loss="nkd", cache="-")
    optimizer = make_optimizer(cfg, s_model)
    spec, args = get_loss("nkd"), parse_loss_args("nkd", ())
    s_mean, s_std = (torch.tensor(v).view(1, -1, 1, 1) for v in model_normalization(student))
    with torch.no_grad():
        soft = TopKLogits.from_logits(t_model.logits(images), target, k, (1.0,))

    def student_step() -> None:
        x = images.float().div_(255).sub_(s_mean).div_(s_std)
        logits = s_model(x)
        loss = sum(spec.terms(logits, target, args=args, teacher=soft).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out = {"t_teacher": [], "t_student": []}
    for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits both; the fastest is the least disturbed
        out["t_teacher"] += _times_s(teacher_forward, 1)
        out["t_student"] += _times_s(student_step, 1)
    return {k: min(v) for k, v in out.items()}


# ------------------------------------------------------------------ the two settings
def bench_setting(name: str, tmp: Path, *, data: str, source: str, student: str, teacher: str, recipe: str,
                  image_size: int, batch: int, topk: int, workers: int, rounds: int, online: bool,
                  step_repeats: int, log, syncs_only: bool = False) -> dict:
    manifest = load_manifest(data)
    cache = str(tmp / f"{name}-cache")
    t0 = time.perf_counter()
    dump(DumpConfig(data=data, out=cache, teacher=teacher, recipe=recipe, image_size=image_size, epochs=1,
                    topk=topk, batch_size=batch, progress=False))
    dump_s = time.perf_counter() - t0
    runs = tmp / f"{name}-runs"
    runs.mkdir()
    common = dict(data=data, student=student, batch_size=batch, workers=workers, recipe=recipe,
                  image_size=image_size)
    kinds: dict[str, dict] = {
        "ce": dict(loss="ce"),
        "nkd_cached": dict(loss="nkd", cache=cache, recipe=None, image_size=None),
    }
    if online:
        kinds["nkd_online"] = dict(loss="nkd", teacher=teacher)
    log(f"[{name}] {source}; {manifest.num_samples} images in {len(manifest.shards)} shards; student {student}, "
        f"teacher {teacher}, {recipe} recipe at {image_size} px, batch {batch}, workers {workers}; "
        f"dump {dump_s:.1f} s")
    profile = {kind: sync_profile(runs, f"syncs-{kind}", **{**common, **kw}) for kind, kw in kinds.items()}
    for kind, p in profile.items():
        log(f"[{name}] {kind:<11} {p['hot_path_per_step']:.2f} syncs/step in the hot path over {p['steps']} steps "
            f"{p['hot_path_by_call'] or ''}; display every {LOG_EVERY} steps: {p['display_per_step']:.2f}/step")
    if syncs_only:
        return {"source": source, "images": manifest.num_samples, "student": student, "teacher": teacher,
                "recipe": recipe, "image_size": image_size, "batch_size": batch, "workers": workers,
                "sync_profile": profile}
    for kind, kw in kinds.items():  # untimed warm-up on one shard: allocator, oneDNN primitives, page cache
        train_epoch(runs, f"warmup-{kind}", **{**common, **kw, "shards": (0,)})
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind, kw in kinds.items():
            res = train_epoch(runs, kind, **{**common, **kw})
            results[kind].append(res)
            log(f"[{name}] round {r + 1}/{rounds} {kind:<11} {res['seconds']:7.2f} s  "
                f"{res['images_per_s']:8.1f} img/s")
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in results.items()}
    load_after = os.getloadavg()
    median_s = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    out = {
        "source": source, "images": manifest.num_samples, "shards": len(manifest.shards), "student": student,
        "teacher": teacher, "recipe": recipe, "image_size": image_size, "batch_size": batch, "workers": workers,
        "topk": topk, "dump_seconds": dump_s, "rounds": results, "best": best, "median_seconds": median_s,
        "load_average_after": load_after,
        "throughput_ratio_cached_nkd_over_ce": best["nkd_cached"]["images_per_s"] / best["ce"]["images_per_s"],
        "sync_profile": profile,
    }
    # the DataLoader alone, as the loop builds it (what part of a step is data, not model)
    recipe_obj = get_recipe(recipe, image_size)
    fresh = FreshViews(data, seed=0, epoch=0, recipe=recipe_obj, shuffle_seed=0, rank=0, world_size=1)
    cached = CachedViews(data, cache, epoch=0, shuffle_seed=0, rank=0, world_size=1)
    out["t_data_fresh"] = min(loader_seconds_per_batch(fresh, batch, workers) for _ in range(3))
    out["t_data_cached"] = min(loader_seconds_per_batch(cached, batch, workers) for _ in range(3))
    if online:
        times = step_times(student, teacher, manifest.num_classes, image_size, batch, topk, step_repeats)
        t_teacher, t_student, t_data = times["t_teacher"], times["t_student"], out["t_data_cached"]
        ideal = (t_teacher + t_student) / t_student
        measured = best["nkd_online"]["seconds"] / best["nkd_cached"]["seconds"]
        out.update({
            "t_teacher": t_teacher, "t_student": t_student,
            "wall_ratio_online_over_cached": measured,
            "ideal_ratio": ideal,
            "fraction_of_ideal": measured / ideal,
            "ideal_ratio_with_data": (t_data + t_teacher + t_student) / (t_data + t_student),
        })
        out["fraction_of_ideal_with_data"] = measured / out["ideal_ratio_with_data"]
    return out


def report_syncs(name: str, s: dict, log) -> None:
    log(f"  (c) host-device syncs per step ({name}): "
        + ", ".join(f"{k} {p['hot_path_per_step']:.2f} in the hot path ({p['steps']} steps) + "
                    f"{p['display_per_step']:.2f} at the display" for k, p in s["sync_profile"].items())
        + f"  (target 0 in the hot path for {', '.join(ZERO_SYNC_RUNS)}: "
        + ("OK" if all(s["sync_profile"][k]["hot_path_syncs"] == 0 for k in ZERO_SYNC_RUNS) else "NOT MET") + ")")


def report(name: str, s: dict, log) -> None:
    report_syncs(name, s, log)
    b = s["best"]
    log(f"\n== {name}: {s['student']} <- {s['teacher']}, {s['recipe']} {s['image_size']} px, batch {s['batch_size']},"
        f" {s['images']} images ({s['source']})")
    log(f"  {'run':<24} {'best epoch s':>13} {'img/s':>9} {'median s':>9}  (over {len(s['rounds']['ce'])} rounds)")
    for kind, res in b.items():
        log(f"  {kind:<24} {res['seconds']:13.2f} {res['images_per_s']:9.1f} {s['median_seconds'][kind]:9.2f}")
    log(f"  DataLoader alone: fresh views {1000 * s['t_data_fresh']:.1f} ms/batch, cached views + rows "
        f"{1000 * s['t_data_cached']:.1f} ms/batch")
    spread = max(s["median_seconds"][k] / b[k]["seconds"] for k in b)
    if spread > 1.25:
        log(f"  WARNING: a median round took {spread:.1f}x the best one: the machine was busy (load average "
            f"{s['load_average_after'][0]:.1f}); the best rounds are used, but rerun on a quiet machine to trust "
            f"these figures")
    ratio = s["throughput_ratio_cached_nkd_over_ce"]
    log(f"  (a) cached NKD / CE throughput = {ratio:.3f}  (target >= {TARGET_THROUGHPUT_RATIO}: "
        f"{'OK' if ratio >= TARGET_THROUGHPUT_RATIO else 'BELOW'})")
    if "ideal_ratio" in s:
        log(f"  t_teacher {1000 * s['t_teacher']:.1f} ms/batch, t_student {1000 * s['t_student']:.1f} ms/batch")
        frac = s["fraction_of_ideal"]
        log(f"  (b) online / cached NKD wall time = {s['wall_ratio_online_over_cached']:.3f}; ideal "
            f"(t_teacher + t_student) / t_student = {s['ideal_ratio']:.3f}; reached {100 * frac:.1f}% of the ideal "
            f"(target >= {100 * TARGET_FRACTION_OF_IDEAL:.0f}%: "
            f"{'OK' if frac >= TARGET_FRACTION_OF_IDEAL else 'BELOW'})")
        log(f"      with data loading in both: ideal {s['ideal_ratio_with_data']:.3f}, reached "
            f"{100 * s['fraction_of_ideal_with_data']:.1f}%")


def headline_rows(summary: dict) -> dict:
    """The figures as rows ``{what, detail, ratio, target}`` (the shape `pipelines/bench.py` tabulates)."""
    rows = {}
    for name in ("small", "imagenet"):
        s = summary.get(name)
        if s is None:
            continue
        for kind in ZERO_SYNC_RUNS:
            p = s["sync_profile"][kind]
            rows[f"syncs_per_step_{kind}_{name}"] = {
                "what": f"host-device syncs per step, {kind} ({s['student']}, {s['image_size']} px)",
                "detail": f"{p['hot_path_syncs']} in the hot path over {p['steps']} steps; {p['display_syncs']} at "
                          f"the display every {LOG_EVERY} steps",
                "ratio": p["hot_path_per_step"], "target": "0"}
        if "best" not in s:
            continue
        b = s["best"]
        rows[f"cached_nkd_over_ce_{name}"] = {
            "what": f"cached NKD / CE train throughput ({s['student']}, {s['image_size']} px)",
            "detail": f"{b['nkd_cached']['images_per_s']:.1f} vs {b['ce']['images_per_s']:.1f} img/s, batch "
                      f"{s['batch_size']}, workers {s['workers']}",
            "ratio": s["throughput_ratio_cached_nkd_over_ce"], "target": f">= {TARGET_THROUGHPUT_RATIO}"}
        if "ideal_ratio" in s:
            rows["online_over_cached_nkd"] = {
                "what": f"online / cached NKD wall time ({s['teacher']} -> {s['student']}, {s['image_size']} px)",
                "detail": f"{b['nkd_online']['seconds']:.2f} vs {b['nkd_cached']['seconds']:.2f} s/epoch; ideal "
                          f"{s['ideal_ratio']:.3f} (t_teacher {1000 * s['t_teacher']:.0f} ms, t_student "
                          f"{1000 * s['t_student']:.0f} ms per batch)",
                "ratio": s["wall_ratio_online_over_cached"], "target": f"{s['ideal_ratio']:.3f} (ideal)"}
            rows["fraction_of_ideal"] = {
                "what": "online/cached speed-up reached, as a fraction of the ideal",
                "detail": f"{s['wall_ratio_online_over_cached']:.3f} / {s['ideal_ratio']:.3f}; with data loading in "
                          f"the ideal: {s['fraction_of_ideal_with_data']:.3f}",
                "ratio": s["fraction_of_ideal"], "target": f">= {TARGET_FRACTION_OF_IDEAL}"}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-images", type=int, default=8192)
    parser.add_argument("--small-batch", type=int, default=128)
    parser.add_argument("--imagenet-images", type=int, default=256)
    parser.add_argument("--imagenet-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112, help="the imagenet setting's input size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers in every run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds of each run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", choices=("small", "imagenet"), default=None, help="run one setting")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--syncs-only", action="store_true",
                        help="only the step profile (c), on 1,024 small and 64 imagenet images")
    parser.add_argument("--json", dest="as_json", action="store_true", help="JSON summary on stdout only")
    args = parser.parse_args(argv)
    if args.syncs_only:
        args.small_images, args.imagenet_images = min(args.small_images, 1024), min(args.imagenet_images, 64)
    if args.smoke:
        args.small_images, args.imagenet_images, args.rounds = 256, 16, 1
        args.small_batch, args.imagenet_batch, args.image_size = 64, 8, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    out = sys.stderr if args.as_json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=out, flush=True)

    machine = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(), "device": "cpu",
    }
    log(f"machine: {machine}")
    started = time.perf_counter()
    summary: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine,
                     "argv": sys.argv[1:], "targets": {"throughput_ratio": TARGET_THROUGHPUT_RATIO,
                                                       "fraction_of_ideal": TARGET_FRACTION_OF_IDEAL}}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "small"):
            data = tmp / "small"
            source = write_small_data(data, args.small_images, per_shard=max(args.small_images // 8, 1))
            summary["small"] = bench_setting(
                "small", tmp, data=str(data), source=source, student="smallcnn", teacher="smallcnn_wide",
                recipe="small", image_size=28, batch=args.small_batch, topk=5, workers=args.workers,
                rounds=args.rounds, online=False, step_repeats=8, log=log, syncs_only=args.syncs_only)
        if args.only in (None, "imagenet"):
            data = tmp / "imagenet"
            source = write_imagenet_data(data, args.imagenet_images, per_shard=max(args.imagenet_images // 4, 1))
            summary["imagenet"] = bench_setting(
                "imagenet", tmp, data=str(data), source=source, student="resnet18", teacher="resnet34",
                recipe="imagenet", image_size=args.image_size, batch=args.imagenet_batch, topk=10,
                workers=args.workers, rounds=args.rounds, online=True, step_repeats=8, log=log,
                syncs_only=args.syncs_only)
    for name in ("small", "imagenet"):
        if name in summary:
            (report_syncs if args.syncs_only else report)(name, summary[name], log)
    summary.update(headline_rows(summary))
    summary["seconds"] = time.perf_counter() - started
    log(f"\ntotal {summary['seconds']:.0f} s")
    if args.as_json:
        json.dump(summary, sys.stdout, indent=1, default=float)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
