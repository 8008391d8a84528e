"""Fashion-MNIST accuracy table: CE, KD, NKD (cached), NKD (online), USKD, tf-NKD, PS-KD — top-1 and ECE,
mean ± std over 3 seeds (issue 6). An offline run (about 25 minutes on 2 CPU cores), not part of CI.

    .venv/bin/python pipelines/fmnist_table.py [--out runs/fmnist-table] [--seeds 0,1,2] [--epochs 5]

Teacher: `smallcnn_wide` trained with CE on all 60,000 training images (or `--teacher-checkpoint`). Its cache
holds `--epochs` views per sample (dump seed 0). Students: `smallcnn` on `--train-shards` (default 0-29,
30,000 images), SGD lr 0.1, cosine, 5 epochs, evaluated on the 10,000 test images. Each seed changes the
student's initialisation, data order and — for online and teacher-free runs — the views; cached runs replay the
cached views with every seed, so cached vs online NKD also measures the effect of fixed vs fresh views.
Writes `OUT/table.json` and `OUT/table.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = [  # (label, loss, source)
    ("CE", "ce", None),
    ("KD (cached)", "kd", "cache"),
    ("NKD (cached)", "nkd", "cache"),
    ("NKD (online)", "nkd", "online"),
    ("USKD", "uskd", None),
    ("tf-NKD", "tf-nkd", None),
    ("PS-KD", "pskd", None),
]


def cli(args: list[str]) -> None:
    print(f"$ logitcache {' '.join(args)}", flush=True)
    if subprocess.run([sys.executable, "-m", "logitcache.cli", *args], cwd=REPO).returncode != 0:
        sys.exit(f"failed: logitcache {' '.join(args)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/fmnist-table")
    ap.add_argument("--data", default=None, help="Fashion-MNIST shards dir with train/ and test/ (default: make)")
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-shards", default="0-29")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--methods", default=None,
                    help="comma-separated method labels (default: all), e.g. 'KD (cached),NKD (cached),NKD (online)'")
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--recipe", "small", "--image-size", "28", "--workers", str(args.workers)]
    data_dir = Path(args.data) if args.data else out / "data"
    if not (data_dir / "train" / "manifest.json").exists():
        cli(["shards", "fashion-mnist", "--out", str(data_dir), "--overwrite"])
    data, val = str(data_dir / "train"), str(data_dir / "test")
    teacher = args.teacher_checkpoint
    if teacher is None:
        teacher_dir = out / "teacher"
        if not (teacher_dir / "checkpoints" / "last.pt").exists():
            cli(["train", "--data", data, "--val", val, "--out", str(teacher_dir), "--student", "smallcnn_wide",
                 "--loss", "ce", "--epochs", str(args.teacher_epochs), "--batch-size", "128", "--lr", "0.05",
                 "--warmup-epochs", "0.2", "--weight-decay", "5e-4", "--no-progress", *common])
        teacher = str(teacher_dir / "checkpoints" / "last.pt")
    cache = str(out / "cache.zarr")
    cli(["dump", "--teacher", "smallcnn_wide", "--weights", teacher, "--data", data, "--out", cache,
         "--epochs", str(args.epochs), "--topk", "5", "--batch-size", "256", "--shards", args.train_shards,
         "--seed", "0", *common])
    methods = METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = sorted(set(wanted) - {label for label, _, _ in METHODS})
        if unknown:
            sys.exit(f"unknown method(s) {unknown}: choose from {[label for label, _, _ in METHODS]}")
        methods = [m for m in METHODS if m[0] in wanted]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in methods}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, loss, source in methods:
            run_dir = out / f"{loss}-{source or 'free'}-seed{seed}"
            extra = {"cache": ["--cache", cache],
                     "online": ["--teacher", "smallcnn_wide", "--weights", teacher]}.get(source, [])
            if not (run_dir / "metrics.jsonl").exists() or len(
                    (run_dir / "metrics.jsonl").read_text().strip().splitlines()) < args.epochs:
                resume = ["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else []
                t0 = time.time()
                cli(["train", "--data", data, "--val", val, "--out", str(run_dir), "--student", "smallcnn",
                     "--loss", loss, *extra, "--epochs", str(args.epochs), "--batch-size", "128", "--lr", "0.1",
                     "--warmup-epochs", "0.2", "--weight-decay", "5e-4", "--shards", args.train_shards,
                     "--seed", str(seed), "--no-progress", *resume, *common])
                print(f"   {label} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().strip().splitlines()]
            last = lines[-1]
            results[label].append({"seed": seed, "top1": last["val"]["top1"], "ece": last["val"]["ece"],
                                   "nll": last["val"]["nll"], "aurc": last["val"]["aurc"],
                                   "s_per_epoch": statistics.mean(x["train"]["seconds"] for x in lines)})

    def ms(xs):
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = ["| method | top-1 % (mean ± std) | ECE % (mean ± std) | NLL | s/epoch |", "|---|---|---|---|---|"]
    for label, rows in results.items():
        t, e = ms([100 * r["top1"] for r in rows]), ms([100 * r["ece"] for r in rows])
        n = statistics.mean(r["nll"] for r in rows)
        sec = statistics.mean(r["s_per_epoch"] for r in rows)
        table.append(f"| {label} | {t[0]:.2f} ± {t[1]:.2f} | {e[0]:.2f} ± {e[1]:.2f} | {n:.4f} | {sec:.1f} |")
    header = (f"Fashion-MNIST test (10,000 images); student smallcnn, {args.epochs} epochs on training shards "
              f"{args.train_shards}; teacher smallcnn_wide (CE); seeds {args.seeds}; "
              f"`.venv/bin/python pipelines/fmnist_table.py`, {time.strftime('%Y-%m-%d')}")
    text = header + "\n\n" + "\n".join(table)
    (out / "table.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
