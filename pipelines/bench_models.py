"""Throughput of the small-image models on CPU: SGD train step and inference, img/s, NCHW vs channels_last.

Used to choose the Fashion-MNIST demo's student and teacher (CONTRACTS §5: the student must be fast on 2 CPU
cores). Synthetic 28 px inputs (the demo's size), batch 128; each figure is the best of a few timed rounds,
because the machine is shared and the best round is the least disturbed one.

    .venv/bin/python pipelines/bench_models.py                   # table on stdout
    .venv/bin/python pipelines/bench_models.py --json            # JSON summary on stdout, the table on stderr
    .venv/bin/python pipelines/bench_models.py --models smallcnn,resnet8x4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torchvision

from logitcache.models.zoo import attach_weak_head, build_model

DEFAULT_MODELS = "smallcnn,smallcnn_wide,resnet8x4"


def images_per_s(model: torch.nn.Module, batch: int, size: int, *, train: bool, channels_last: bool, steps: int,
                 rounds: int = 3, seed: int = 0) -> float:
    """Best-of-`rounds` img/s over `steps` steps (train: forward + CE on every output + backward + SGD update)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train(train)

    def step() -> None:
        if train:
            out = model(x)
            outputs = out if isinstance(out, tuple) else (out,)  # a WeakHeadModel trains both heads
            loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                model(x)

    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        step()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = max(best, batch * steps / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed round (2 for models over 1M params)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo machine has 2 cores)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="JSON summary on stdout only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = sys.stderr if args.as_json else sys.stdout
    machine = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
    }
    print(f"machine: {machine}", file=out)
    print(f"batch {args.batch_size}, {args.image_size} px; img/s, best of 3 rounds", file=out)
    print(f"{'model':<16} {'params':>9} {'layout':<14} {'train img/s':>12} {'infer img/s':>12}", file=out)
    rows = []
    cases = [(name, False) for name in args.models.split(",") if name] + [("smallcnn", True)]
    for name, weak in cases:
        model = build_model(name, 10)
        if weak:
            model = attach_weak_head(model, name, 10, image_size=args.image_size)
        params = sum(p.numel() for p in model.parameters())
        steps = args.steps if params < 1_000_000 else max(2, args.steps // 6)
        for channels_last in (False, True):
            kw = {"train": True, "channels_last": channels_last, "steps": steps}
            train_rate = images_per_s(model, args.batch_size, args.image_size, **kw)
            infer_rate = images_per_s(model, args.batch_size, args.image_size, **{**kw, "train": False})
            label = f"{name}+weak" if weak else name
            layout = "channels_last" if channels_last else "NCHW"
            rows.append({"model": label, "params": params, "layout": layout, "train_img_per_s": train_rate,
                         "infer_img_per_s": infer_rate})
            print(f"{label:<16} {params:>9,} {layout:<14} {train_rate:>12,.0f} {infer_rate:>12,.0f}", file=out)
    if args.as_json:
        json.dump({"machine": machine, "batch_size": args.batch_size, "image_size": args.image_size, "rows": rows},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
