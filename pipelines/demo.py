"""The Fashion-MNIST demo: the whole logitcache story on real data, on a CPU, in a few minutes.

    .venv/bin/python pipelines/demo.py [--out runs/demo] [--teacher-shards 0-29] [--train-shards 0-14] [--epochs 3]

1. `logitcache shards fashion-mnist`   the IDX files -> webdataset shards + manifests (train 60k, test 10k)
2. `logitcache train` (teacher)        smallcnn_wide with cross-entropy
3. `logitcache dump`                   the teacher once over augmented views -> top-k cache
4. `logitcache train` x 4 students     smallcnn with CE, KD and NKD (from the cache), and USKD (teacher-free)
5. `logitcache eval`, `info`, `plot`   one table: top-1, top-5, NLL, ECE, AURC, s/epoch, cache size, B/view

Every step is a real CLI command, printed before it runs; each is skipped when its output already exists (so
an interrupted demo continues where it stopped). Sized to finish within 15 minutes on the slowest 2-core
machines of this project's kind (issue 19 measured a 2-core EPYC without AVX-512 ~3.7x slower than the machine
the README's figure comes from): the teacher trains 2 epochs on half of the training set (`--teacher-shards
0-29`, 30,000 images) and the students 3 epochs on a quarter (`--train-shards 0-14`, 15,000 images).
`--teacher-shards all --teacher-epochs 3 --train-shards all` runs the full-size version (about 4x longer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "logitcache.cli"]
STUDENT_LOSSES = ("ce", "kd", "nkd", "uskd")


def run(args: list[str], *, capture: bool = False) -> str:
    cmd = [*CLI, *args]
    print(f"\n$ logitcache {shlex.join(args)}", flush=True)
    res = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"demo: step failed (exit {res.returncode}): logitcache {shlex.join(args)}")
    return res.stdout if capture else ""


def last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().strip().splitlines()
    return json.loads(lines[-1])


def finished(run_dir: Path, epochs: int) -> bool:
    try:
        return last_metrics(run_dir)["epoch"] == epochs - 1
    except (FileNotFoundError, IndexError, KeyError, json.JSONDecodeError):
        return False


def cpu_model() -> str:
    """The CPU's model name and widest vector unit torch uses: the demo's time depends on both."""
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return f"{name}, torch CPU capability {res.stdout.strip() or 'unknown'}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist", help="the Fashion-MNIST IDX files")
    ap.add_argument("--train-shards", default="0-14", help="shards the students train on ('all' for 60k)")
    ap.add_argument("--teacher-shards", default="0-29", help="shards the teacher trains on ('all' for 60k)")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="student epochs (= cached views per sample)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"logitcache demo -> {out}\nExpect 3-15 minutes on 2 CPU cores (see the README); every step shows its "
          "progress.")
    shards = [] if args.train_shards == "all" else ["--shards", args.train_shards]
    teacher_shards = [] if args.teacher_shards == "all" else ["--shards", args.teacher_shards]
    common = ["--recipe", "small", "--image-size", "28", "--workers", str(args.workers), "--seed", str(args.seed)]
    data, val = out / "data" / "train", out / "data" / "test"

    # 1. shards
    if not (data / "manifest.json").exists() or not (val / "manifest.json").exists():
        if not Path(args.src, "train-images-idx3-ubyte.gz").exists():
            sys.exit(f"demo: no Fashion-MNIST IDX files in {args.src}: `apt-get install dataset-fashion-mnist` "
                     "(or `make demo`, which installs it), or pass --src DIR")
        run(["shards", "fashion-mnist", "--src", args.src, "--out", str(out / "data"), "--overwrite"])
    wall: dict[str, float] = {}

    # 2. the teacher
    teacher_dir = out / "teacher"
    if not finished(teacher_dir, args.teacher_epochs):
        t0 = time.time()
        run(["train", "--data", str(data), "--val", str(val), "--out", str(teacher_dir),
             "--student", "smallcnn_wide", "--loss", "ce", "--epochs", str(args.teacher_epochs),
             "--batch-size", "128", "--lr", "0.05", "--warmup-epochs", "0.2", "--weight-decay", "5e-4",
             *common, *teacher_shards, *(["--resume"] if (teacher_dir / "checkpoints" / "last.pt").exists() else [])])
        wall["teacher"] = time.time() - t0
    teacher_ckpt = teacher_dir / "checkpoints" / "last.pt"

    # 3. the dump: the teacher once over `epochs` augmented views of every training sample
    cache = out / "cache.zarr"
    t0 = time.time()
    run(["dump", "--teacher", "smallcnn_wide", "--weights", str(teacher_ckpt), "--data", str(data),
         "--out", str(cache), "--epochs", str(args.epochs), "--topk", str(args.topk), "--batch-size", "256",
         *common, *shards])
    wall["dump"] = time.time() - t0
    info = json.loads(run(["info", str(cache), "--json"], capture=True))["groups"]["smallcnn_wide"]

    # 4. students: CE, KD and NKD from the cache, USKD teacher-free
    runs = {}
    for loss in STUDENT_LOSSES:
        run_dir = out / f"student-{loss}"
        runs[loss] = run_dir
        if finished(run_dir, args.epochs):
            continue
        extra = ["--cache", str(cache)] if loss in ("kd", "nkd") else []
        t0 = time.time()
        run(["train", "--data", str(data), "--val", str(val), "--out", str(run_dir), "--student", "smallcnn",
             "--loss", loss, *extra, "--epochs", str(args.epochs), "--batch-size", "128", "--lr", "0.1",
             "--warmup-epochs", "0.2", "--weight-decay", "5e-4", *common, *shards,
             *(["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else [])])
        wall[f"student {loss}"] = time.time() - t0

    # 5. evaluate every student on the 10k test images, plot, and print one table
    rows = []
    for name, run_dir in [("teacher (smallcnn_wide, ce)", teacher_dir),
                          *[(f"smallcnn {loss}" + (" (cache)" if loss in ("kd", "nkd") else ""), d)
                            for loss, d in runs.items()]]:
        res = json.loads(run(["eval", "--model", "smallcnn_wide" if run_dir == teacher_dir else "smallcnn",
                              "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--data", str(val),
                              "--recipe", "small", "--image-size", "28", "--json"], capture=True))
        m = res.get("metrics", res)
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        sec = sum(e["train"]["seconds"] for e in epochs) / len(epochs)
        rows.append((name, m, sec))
        run(["plot", str(run_dir)])
    run(["plot", *[str(d) for d in runs.values()], "--out", str(out / "compare"),
         *sum((["--label", loss] for loss in runs), [])])

    print("\n" + "=" * 100)
    print(f"Fashion-MNIST test set (10,000 images); students trained {args.epochs} epochs on "
          f"{'all' if not shards else 'shards ' + args.train_shards} of the training set")
    print(f"{'model':32s} {'top-1 %':>8} {'top-5 %':>8} {'NLL':>7} {'ECE %':>7} {'AURC x1000':>11} {'s/epoch':>8}")
    for name, m, sec in rows:
        print(f"{name:32s} {100 * m['top1']:8.2f} {100 * m['top5']:8.2f} {m['nll']:7.4f} {100 * m['ece']:7.2f} "
              f"{1000 * m['aurc']:11.2f} {sec:8.1f}")
    print(f"\ncache {cache}: {info['views']} views ({args.epochs} per sample), k={info['k']}, {info['bytes']:,} bytes, "
          f"{info['bytes_per_view']:.1f} B/view"
          + (f" ({info['allocated_bytes']:,} allocated on this disk: {info['allocated_bytes'] / info['bytes']:.2f}x, "
             f"{info['objects']} objects)" if info.get("allocated_bytes") else "")
          + "; teacher top-1 on the augmented views "
          f"{100 * info['teacher_top1']:.2f}%, mean top-{info['k']} mass {info['mean_topk_mass']:.4f}")
    print(f"plots: {out}/*/plots/*.png and {out}/compare/*.png")
    print("wall time per step (this run; skipped steps not shown): "
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in wall.items()))
    print(f"total wall time {(time.time() - t_start) / 60:.1f} min on {os.cpu_count()} CPU core(s), "
          f"{cpu_model()}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
