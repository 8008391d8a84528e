"""GPU acceptance check (issue 14): the day-one ImageNet path on one GPU, end to end, in under 8 minutes.

    .venv/bin/python pipelines/gpu_check.py                 # on a machine with a GPU
    .venv/bin/python pipelines/gpu_check.py --cpu-smoke     # the same steps, tiny, on the CPU (CI runs this)

Steps, each a real CLI command (printed before it runs) over synthetic ImageNet-size shards (JPEGs of about
500x375 px made with PIL from smooth noise, 1000 classes):
  1. bare teacher: the teacher's forward alone on device-resident batches (the ceiling for a dump)
  2. dump at --teacher-precision bf16 and fp32 (two groups of one cache, the same views)
  3. verify --recompute on both groups (the tolerance is the recorded precision's) and the bf16 group's error
     against the fp32 group on the same views (FORMAT.md "Teacher precision")
  4. train with AMP, channels_last and --compile: CE, cached NKD, online KD, USKD (teacher-free)
Then prints the GPU's name and a table, with the ratios dump / bare teacher and cached NKD / CE (throughputs
of each run's last epoch, so compilation and warm-up are left out), and writes it as JSON to --out/gpu_check.json.

--cpu-smoke: 8 images of about 64x48 px at 32 px, resnet18 teacher and student, one epoch, no --compile (a CPU
compile of resnet18 takes minutes; --compile forces it). It checks that every step runs, not any speed.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def make_shards(out: Path, n: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> None:
    """``n`` JPEGs of about ``size`` (w, h) px, smooth random content (compresses like a photo), 1000 classes."""
    from PIL import Image

    from logitcache.data.write import write_shards

    rng = np.random.default_rng(seed)
    w0, h0 = size

    def samples():
        for i in range(n):
            w, h = int(w0 * rng.uniform(0.85, 1.0)), int(h0 * rng.uniform(0.85, 1.0))
            small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield f"img{i:06d}", {"jpg": buf.getvalue(), "cls": str(int(rng.integers(0, 1000))).encode()}

    write_shards(samples(), out, class_names=[f"n{i:08d}" for i in range(1000)], samples_per_shard=per_shard)


def cli(args: list[str], *, nproc: int = 1) -> float:
    """Run ``logitcache ARGS`` (under torchrun with ``nproc`` > 1); returns its wall time in seconds."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    print(f"\n$ logitcache {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    res = subprocess.run([*launcher, "-m", "logitcache.cli", *args], cwd=REPO)
    if res.returncode != 0:
        sys.exit(f"gpu_check: step failed (exit {res.returncode}): logitcache {shlex.join(args)}")
    return time.perf_counter() - t0


def cli_json(args: list[str]) -> dict:
    print(f"\n$ logitcache {shlex.join(args)}", flush=True)
    res = subprocess.run([sys.executable, "-m", "logitcache.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        sys.exit(f"gpu_check: step failed (exit {res.returncode}): logitcache {shlex.join(args)}\n{res.stdout}")
    return json.loads(res.stdout)


def bare_teacher(teacher: str, image_size: int, batch: int, precision: str, device: str, seconds: float) -> float:
    """Images/s of the teacher's forward alone: uint8 batches already on the device, the dump's runner
    (`Teacher.logits`: normalisation, memory format, precision) and nothing else."""
    from logitcache.teacher import Teacher

    runner = Teacher.load(teacher, None, 1000, image_size, device, 0, precision=precision)
    x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
            runner.logits(x)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            runner.logits(x)
            n += batch
        sync()
        return n / (time.perf_counter() - t0)


def precision_error(cache: str, a: str, b: str) -> dict:
    """Largest |difference| of the true-class log-prob and the log-partition between groups ``a`` and ``b``
    (the same views: same data, seed and recipe) over every unit."""
    from logitcache.cache.reader import CacheReader

    ra, rb = CacheReader(cache, a), CacheReader(cache, b)
    worst = {"target_logprob": 0.0, "lse": 0.0, "same_top1": 0, "views": 0}
    for e, s in sorted(ra.markers()):
        # through the one stored-rows -> TopKLogits conversion, so any cache format compares the same way
        ua, ub = ra.read_unit(e, s).topk(ra.meta), rb.read_unit(e, s).topk(rb.meta)
        worst["target_logprob"] = max(worst["target_logprob"],
                                      float((ua.target_logprob - ub.target_logprob).abs().max()) if len(ua) else 0.0)
        worst["lse"] = max(worst["lse"], float((ua.lse - ub.lse).abs().max()) if len(ua) else 0.0)
        worst["same_top1"] += int((ua.indices[:, 0] == ub.indices[:, 0]).sum())
        worst["views"] += len(ua)
    return worst


def last_epoch_rate(run: Path) -> float:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return float(lines[-1]["train"]["images_per_s"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU: every step runs (CI)")
    ap.add_argument("--out", default=None, help="keep the data, cache and runs here (default: a temp dir)")
    ap.add_argument("--images", type=int, default=None, help="training images (default 4096; smoke 16)")
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: logitcache's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="train with --compile (default: on a GPU yes, in --cpu-smoke no)")
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --cpu-smoke to check the steps on the CPU")
    device = "cpu" if smoke else "cuda"
    gpu = "CPU (smoke)" if smoke else torch.cuda.get_device_name(0)
    n = args.images or (8 if smoke else 4096)
    per_shard = 4 if smoke else 256
    size = (64, 48) if smoke else (500, 375)
    image_size = 32 if smoke else 224
    batch = 8 if smoke else args.batch_size
    teacher = "resnet18" if smoke else args.teacher
    compile_flag = ["--compile"] if (args.compile if args.compile is not None else not smoke) else []
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(tmp.name if tmp else args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, cache = out / "data", str(out / "cache.zarr")
    print(f"gpu_check on {gpu}: {n} images ~{size[0]}x{size[1]} px, teacher {teacher}, student {args.student}, "
          f"{image_size} px, batch {batch}", flush=True)

    t0 = time.perf_counter()
    results: dict = {"device": gpu, "torch": torch.__version__, "host": platform.node(), "images": n,
                     "image_size": image_size, "teacher": teacher, "student": args.student, "steps": {}}
    steps = results["steps"]
    make_shards(data, n, per_shard, size)
    steps["make_shards_s"] = time.perf_counter() - t0

    common = ["--recipe", "imagenet", "--image-size", str(image_size), "--device", device, "--batch-size",
              str(batch), *workers]
    dump_epochs = 1 if smoke else 2
    for prec in ("bf16", "fp32"):
        steps[f"bare_teacher_{prec}_img_s"] = bare_teacher(teacher, image_size, batch, prec, device,
                                                           seconds=1.0 if smoke else 10.0)
        summary = cli_json(["dump", "--teacher", teacher, "--data", str(data), "--out", cache, "--group", prec,
                            "--teacher-precision", prec, "--epochs", str(dump_epochs), "--topk", "10", *common,
                            "--json"])
        steps[f"dump_{prec}_img_s"] = summary["views_written"] / summary["seconds"]  # the dump's own clock
        steps[f"dump_{prec}_s"] = summary["seconds"]
        rc = cli_json(["verify", cache, "--group", prec, "--data", str(data), "--recompute", "8" if smoke else "256",
                       "--teacher", teacher, "--device", device, "--json"])
        steps[f"verify_{prec}"] = {"ok": rc["ok"], **{k: rc["recompute"][k] for k in (
            "views", "tolerance", "max_abs_logprob_diff", "teacher_precision")}}
        if not rc["ok"]:
            sys.exit(f"gpu_check: verify --recompute failed for group {prec}: {json.dumps(rc['recompute'])[:2000]}")
    steps["bf16_vs_fp32"] = precision_error(cache, "bf16", "fp32")

    epochs = ["--epochs", "1" if smoke else "2"]  # on a GPU the second epoch's speed: no compile, warm caches
    runs = {
        "ce": ["--loss", "ce"],
        "nkd_cached": ["--loss", "nkd", "--cache", cache, "--group", "bf16"],
        "kd_online": ["--loss", "kd", "--teacher", teacher, "--teacher-precision", "bf16"],
        "uskd": ["--loss", "uskd"],
    }
    for name, extra in runs.items():
        run = out / f"run-{name}"
        steps[f"train_{name}_s"] = cli(["train", "--data", str(data), "--out", str(run), "--student", args.student,
                                        *extra, *epochs, *common, *compile_flag, "--no-progress"])
        steps[f"train_{name}_img_s"] = last_epoch_rate(run)

    ratios = {
        "dump_bf16_over_bare_teacher": steps["dump_bf16_img_s"] / steps["bare_teacher_bf16_img_s"],
        "dump_fp32_over_bare_teacher": steps["dump_fp32_img_s"] / steps["bare_teacher_fp32_img_s"],
        "cached_nkd_over_ce": steps["train_nkd_cached_img_s"] / steps["train_ce_img_s"],
        "online_kd_over_ce": steps["train_kd_online_img_s"] / steps["train_ce_img_s"],
        "uskd_over_ce": steps["train_uskd_img_s"] / steps["train_ce_img_s"],
    }
    results["ratios"] = ratios
    results["total_s"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    print(f"\ngpu_check: {gpu}, torch {torch.__version__}, {n} images, {image_size} px, total "
          f"{results['total_s']:.0f} s{' (CPU smoke: speeds mean nothing)' if smoke else ''}")
    print(f"{'step':34s} {'img/s':>10s}")
    for k in ("bare_teacher_bf16", "dump_bf16", "bare_teacher_fp32", "dump_fp32", "train_ce", "train_nkd_cached",
              "train_kd_online", "train_uskd"):
        print(f"{k:34s} {steps[k + '_img_s']:10.1f}")
    for prec in ("bf16", "fp32"):
        v = steps[f"verify_{prec}"]
        print(f"verify --recompute {prec:4s}: {v['views']} views, max |d log-prob| {v['max_abs_logprob_diff']:.2e} "
              f"(tolerance {v['tolerance']})")
    e = steps["bf16_vs_fp32"]
    print(f"bf16 vs fp32 cache: max |d target log-prob| {e['target_logprob']:.3e}, max |d lse| {e['lse']:.3e}, "
          f"top-1 agrees on {e['same_top1']}/{e['views']} views")
    for k, v in ratios.items():
        print(f"{k:34s} {v:10.3f}")
    print(f"wrote {out / 'gpu_check.json'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
