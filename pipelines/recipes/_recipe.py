"""Shared runner for the paper recipes: `dump` once (when the recipe has a teacher), then `train` per student,
then a table with the paper's reported top-1 next to ours.

Every recipe runs as real CLI commands, printed before they run. ``--nproc-per-node N`` launches each command
under ``torchrun --standalone --nproc-per-node N`` (one process per GPU; the dump's ranks take disjoint shards,
training runs DDP in lockstep). ``--smoke`` runs the same commands on tiny synthetic ImageNet-style shards
(random weights, 32 px, one epoch) so that recipes cannot rot: CI runs it, once with two processes (gloo).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Student:
    model: str
    loss: str
    paper_top1: float  # the paper's reported ImageNet top-1 (%) for this student and method
    paper_baseline: float  # the same student trained with CE alone, as reported
    loss_args: tuple[str, ...] = ()
    train_args: tuple[str, ...] = ()  # optimiser/schedule for this student (the paper's setting)


@dataclass(frozen=True)
class PaperRecipe:
    name: str
    source: str  # paper, table
    students: tuple[Student, ...]
    teacher: str | None = None
    teacher_weights: str | None = None
    paper_teacher_top1: float | None = None
    dump_epochs: int = 10
    topk: int = 10
    image_size: int = 224
    notes: tuple[str, ...] = field(default=())
    view_recipe: str = "imagenet"  # the views' recipe (--recipe): imagenet, deit, tv-v2


# the paper trains ResNets and MobileNet for 100 epochs with SGD (lr 0.1 at batch 256, momentum 0.9, wd 1e-4,
# lr x0.1 at epochs 30, 60, 90) in MMClassification
# --batch-size below is the paper's global batch; with --nproc-per-node N each process gets 1/N of it
RESNET_SCHEDULE = ("--epochs", "100", "--batch-size", "256", "--optimizer", "sgd", "--lr", "0.1",
                   "--momentum", "0.9", "--weight-decay", "1e-4", "--schedule", "step",
                   "--step-milestones", "30,60,90")
# DeiT-Tiny: AdamW, lr 5e-4 x batch/512, wd 0.05, cosine over 300 epochs with 5 warm-up epochs
DEIT_SCHEDULE = ("--epochs", "300", "--batch-size", "256", "--optimizer", "adamw", "--lr", "2.5e-4",
                 "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-epochs", "5")


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs ``-m logitcache.cli`` in ``nproc`` processes (torchrun when more than one)."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def cli(args: list[str], *, capture: bool = False, nproc: int = 1) -> str:
    prefix = f"torchrun --standalone --nproc-per-node {nproc} -m logitcache.cli" if nproc > 1 else "logitcache"
    print(f"\n$ {prefix} {shlex.join(args)}", flush=True)
    res = subprocess.run([*launcher(nproc), "-m", "logitcache.cli", *args], cwd=REPO, text=True,
                         stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"recipe: step failed (exit {res.returncode}): logitcache {shlex.join(args)}")
    return res.stdout if capture else ""


def make_smoke_shards(out: Path, n_train: int = 16, n_val: int = 8) -> tuple[Path, Path]:
    """Tiny ImageNet-style shards (real JPEGs, .cls over 1000 classes) for --smoke."""
    import io

    import numpy as np
    from PIL import Image

    from logitcache.data.write import write_shards

    rng = np.random.default_rng(0)

    def samples(n, prefix):
        for i in range(n):
            h, w = int(rng.integers(40, 65)), int(rng.integers(40, 65))
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
            yield f"{prefix}{i:05d}", {"jpg": buf.getvalue(), "cls": str(int(rng.integers(0, 1000))).encode()}

    names = [f"n{i:08d}" for i in range(1000)]
    write_shards(samples(n_train, "train"), out / "train", class_names=names, samples_per_shard=8)
    write_shards(samples(n_val, "val"), out / "val", class_names=names, samples_per_shard=8)
    return out / "train", out / "val"


def _override(args: tuple[str, ...], **values) -> list[str]:
    """Replace the values of some --flags in an argument list (smoke sizes)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        key = a.lstrip("-").replace("-", "_")
        if a.startswith("--") and key in values:
            out += [a, str(values[key])]
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
        else:
            out.append(a)
    return out


def per_process_batch(args: list[str], nproc: int) -> list[str]:
    """The schedules give the paper's global batch; ``train --batch-size`` is per process, so divide it."""
    i = args.index("--batch-size") if "--batch-size" in args else None
    if i is None or nproc <= 1:
        return list(args)
    total = int(args[i + 1])
    if total % nproc:
        sys.exit(f"recipe: the global batch {total} does not split over {nproc} processes")
    return _override(tuple(args), batch_size=total // nproc)


def main(recipe: PaperRecipe, argv=None) -> None:
    ap = argparse.ArgumentParser(description=f"{recipe.name} ({recipe.source})")
    ap.add_argument("--data", help="ImageNet training shards (a manifest.json or a directory/URL holding one)")
    ap.add_argument("--val", help="ImageNet validation shards")
    ap.add_argument("--out", default=f"runs/{recipe.name}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers per process (default: logitcache's, from the cores per process)")
    ap.add_argument("--nproc-per-node", type=int, default=1,
                    help="processes (GPUs) on this machine: each command runs under torchrun with this many")
    ap.add_argument("--dump-epochs", type=int, default=recipe.dump_epochs,
                    help="cached views per sample; training longer cycles them")
    ap.add_argument("--teacher-weights", default=recipe.teacher_weights,
                    help="the teacher's weights: a torchvision weights name or a local file (timm teachers)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, random weights, 1 epoch (CI)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name) / "run"
        data, val = make_smoke_shards(Path(tmp.name) / "data")
        size, device, workers, dump_epochs = 32, "cpu", 0, 1
        weights: list[str] = []
    else:
        if not args.data or not args.val:
            sys.exit("--data and --val (ImageNet shards) are required, or --smoke")
        data, val = args.data, args.val
        size, device, workers, dump_epochs = recipe.image_size, args.device, args.workers, args.dump_epochs
        if recipe.teacher and not args.teacher_weights:
            sys.exit(f"recipe {recipe.name}: the teacher {recipe.teacher} needs --teacher-weights FILE")
        weights = ["--weights", args.teacher_weights] if args.teacher_weights else []
    common = ["--recipe", recipe.view_recipe, "--image-size", str(size), "--device", device,
              *([] if workers is None else ["--workers", str(workers)])]
    nproc = args.nproc_per_node
    print(f"recipe {recipe.name}: {recipe.source}" + "".join(f"\n  note: {n}" for n in recipe.notes))
    cache = str(out / "cache.zarr")
    if recipe.teacher:
        cli(["dump", "--teacher", recipe.teacher, *weights, "--data", str(data), "--out", cache,
             "--epochs", str(dump_epochs), "--topk", str(recipe.topk), "--batch-size", "8" if args.smoke else "256",
             *common], nproc=nproc)
    results = []
    for st in recipe.students:
        run_dir = out / f"{st.model}-{st.loss}"
        train_args = list(st.train_args)
        if args.smoke:
            train_args = _override(st.train_args, epochs=1, batch_size=8 * nproc, warmup_epochs=0)
        train_args = per_process_batch(train_args, nproc)
        source = ["--cache", cache] if recipe.teacher and st.loss in ("kd", "dkd", "nkd") else []
        loss_args = sum((["--loss-arg", a] for a in st.loss_args), [])
        cli(["train", "--data", str(data), "--val", str(val), "--out", str(run_dir), "--student", st.model,
             "--loss", st.loss, *loss_args, *source, *train_args, *common, "--no-progress"], nproc=nproc)
        last = json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])
        results.append((st, last["val"]["top1"]))
    print(f"\n{recipe.name}: ImageNet val top-1 (%), ours vs the paper ({recipe.source})")
    print(f"{'student':14s} {'loss':6s} {'ours':>7} {'paper':>7} {'paper CE baseline':>18}")
    for st, top1 in results:
        print(f"{st.model:14s} {st.loss:6s} {100 * top1:7.2f} {st.paper_top1:7.2f} {st.paper_baseline:18.2f}")
    if args.smoke:
        print("(smoke run: random weights on synthetic data; the figures only show the recipe runs)")
        tmp.cleanup()
