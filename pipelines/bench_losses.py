"""Micro-benchmark: forward+backward time of every loss vs plain CE, and vs one resnet18 training step.

CONTRACTS §7: each loss's forward+backward at batch 64, C = 1000 must be at most 5% of one resnet18 training
step (112 px, batch 64, SGD), both measured in this run on this machine. The ratio to a bare CE is printed
for information (KL-style losses are several × CE, USKD's ranking more; all small in absolute terms).

    .venv/bin/python pipelines/bench_losses.py            # table on stdout
    .venv/bin/python pipelines/bench_losses.py --json     # JSON summary on stdout, the table on stderr
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision

from logitcache.labels.topk import TopKLogits
from logitcache.losses import (
    cross_entropy,
    dkd,
    kd,
    label_smoothing,
    nkd,
    pskd,
    tf_kd,
    tf_nkd,
    uskd,
    zipf_ls,
)

LIMIT_FRACTION = 0.05


def _median_ms(step: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _loss_cases(n: int, c: int, k: int, seed: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, c, generator=g) * 3
    weak = torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, 1, generator=g)
    scores = lam * torch.nn.functional.one_hot(target, c) + (1 - lam) * torch.nn.functional.one_hot((target + 1) % c, c)
    prev = torch.softmax(torch.randn(n, c, generator=g), dim=1)
    votes = torch.randint(0, c, (n, 49), generator=g)  # a 7×7 last feature map
    sparse = TopKLogits.from_logits(teacher, target, k=k, temperatures=(1.0, 4.0))
    return {
        "ce (ours)": lambda s: cross_entropy(s, target),
        "ls": lambda s: label_smoothing(s, target, epsilon=0.1),
        "kd (dense, T=4)": lambda s: kd(s, teacher, temperature=4.0),
        f"kd (top-{k}, T=4)": lambda s: kd(s, sparse, temperature=4.0),
        "dkd (dense)": lambda s: dkd(s, teacher, target, alpha=1.0, beta=0.5, temperature=1.0),
        f"dkd (top-{k})": lambda s: dkd(s, sparse, target, alpha=1.0, beta=0.5, temperature=1.0),
        "nkd (dense)": lambda s: nkd(s, teacher, target),
        f"nkd (top-{k})": lambda s: nkd(s, sparse, target),
        "tf-kd": lambda s: tf_kd(s, target),
        "zipf-ls (logits)": lambda s: zipf_ls(s, target),
        "zipf-ls (votes)": lambda s: zipf_ls(s, target, votes=votes),
        "tf-nkd": lambda s: tf_nkd(s, target),
        "tf-nkd (scores)": lambda s: tf_nkd(s, scores),
        "pskd": lambda s: pskd(s, target, prev, alpha_t=0.3),
        "uskd (paper)": lambda s: uskd(s, weak, target, rank="paper"),
        "uskd (official)": lambda s: uskd(s, weak, target, rank="official"),
        "uskd (scores)": lambda s: uskd(s, weak, scores, rank="paper"),
    }, target


def _time_loss(fn: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, repeats: int) -> float:
    def step() -> None:
        s = base.clone().requires_grad_(True)
        fn(s).backward()

    return _median_ms(step, repeats)


def _resnet18_step_ms(batch: int, size: int, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=1000).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return _median_ms(step, steps, warmup=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=10, help="k of the sparse (cached) teacher cases")
    parser.add_argument("--image-size", type=int, default=112, help="resnet18 input size for the reference step")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per loss (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed resnet18 steps (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="as_json", action="store_true", help="JSON summary on stdout only")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a loss exceeds 5%% of the step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = sys.stderr if args.as_json else sys.stdout

    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": "cpu",
    }
    print(f"machine: {machine}", file=out)

    n, c = args.batch_size, args.classes
    base = torch.randn(n, c, generator=torch.Generator().manual_seed(args.seed + 1)) * 2
    cases, target = _loss_cases(n, c, args.topk, args.seed)
    # the baseline is torch's fused CE; our own CE term (float32 upcast, score labels) is listed as a loss
    ce_ms = _time_loss(lambda s: torch.nn.functional.cross_entropy(s, target), base, args.repeats)
    step_ms = _resnet18_step_ms(n, args.image_size, args.steps, args.seed)
    print(
        f"plain CE (torch) fwd+bwd ({n}, {c}): {ce_ms:.3f} ms;  "
        f"resnet18 step ({n}×3×{args.image_size}²): {step_ms:.1f} ms",
        file=out,
    )
    rows = []
    print(f"{'loss':<20} {'ms':>8} {'× CE':>7} {'% of step':>10}", file=out)
    for name, fn in cases.items():
        ms = _time_loss(fn, base, args.repeats)
        row = {"name": name, "ms": ms, "ratio_to_ce": ms / ce_ms, "fraction_of_step": ms / step_ms}
        rows.append(row)
        flag = "" if row["fraction_of_step"] <= LIMIT_FRACTION else "  > 5% LIMIT"
        print(f"{name:<20} {ms:8.3f} {row['ratio_to_ce']:7.1f} {100 * row['fraction_of_step']:9.2f}%{flag}", file=out)
    worst = max(rows, key=lambda r: r["fraction_of_step"])
    within = worst["fraction_of_step"] <= LIMIT_FRACTION
    print(
        f"worst: {worst['name']} at {100 * worst['fraction_of_step']:.2f}% of a step "
        f"(limit {100 * LIMIT_FRACTION:.0f}%): {'OK' if within else 'OVER'}",
        file=out,
    )
    if args.as_json:
        summary = {
            "machine": machine,
            "batch_size": n,
            "classes": c,
            "topk": args.topk,
            "image_size": args.image_size,
            "ce_ms": ce_ms,
            "resnet18_step_ms": step_ms,
            "limit_fraction_of_step": LIMIT_FRACTION,
            "losses": rows,
            "all_within_limit": within,
        }
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 1 if args.strict and not within else 0


if __name__ == "__main__":
    sys.exit(main())
