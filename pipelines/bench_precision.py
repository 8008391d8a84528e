"""Teacher precision: the error of cached values against a float32 teacher, per ``--teacher-precision``, and the
`verify --recompute` tolerance derived from it (FORMAT.md "Teacher precision").

    .venv/bin/python pipelines/bench_precision.py [--teacher resnet18 --image-size 112 --views 256] [--json]

The teacher runs as the dump runs it (`Teacher.logits` at each precision: autocast body, float32 logits); each
view's values go through `TopKLogits.from_logits` and the stored dtypes (top-k log-probs as float16, true-class
log-prob and log-partition as float32) and are compared with the float32 teacher's log-softmax in float64: the
largest |difference| over the cached top-k log-probs (at the cached classes, as `verify` compares them) and the
true-class log-prob, plus how often the top-k set and the top-1 class agree.

The teacher is a seeded random-initialised network (no pretrained weights on these machines), made to look
trained where it matters for rounding: batch-norm statistics recalibrated on the views (random init leaves them
at 0/1), and the classifier scaled so the mean gap between a view's largest and mean logit is 16.4, that of the
seeded 1000-class generator (`synthetic_teacher.py`) which matches a ResNet-34 on training views. Views are
smooth random pictures (as in the dump benchmark); targets are the fp32 teacher's top-1 for 75% of the views
and a random class otherwise. bf16/fp16 autocast run on the CPU here; their error on a GPU comes from other
kernels (`pipelines/gpu_check.py` prints the bf16-vs-fp32 difference of two dumps on the GPU).

Derived: ``E[p] = 1.25 x the largest error measured at p``, rounded up to 2 significant digits; the table in
`runtime/precision.MEASURED_ERROR` must hold at least that (the script says whether it does).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time

import numpy as np
import torch

#: mean (max logit - mean logit) of synthetic_teacher_logits with its defaults (scale 16, noise 1.8)
TARGET_LOGIT_GAP = 16.4


def smooth_views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8: smooth random pictures, JPEG-encoded and decoded like real views."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(size // 8, 2), max(size // 8, 2), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def calibrate(model: torch.nn.Module, views: torch.Tensor, mean, std, batch: int) -> None:
    """Batch-norm statistics from the views, and the classifier scaled to `TARGET_LOGIT_GAP` (in place)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(views), batch):
            model((views[i:i + batch].float() / 255 - mean) / std)
    model.eval()
    with torch.inference_mode():
        z = torch.cat([model((views[i:i + batch].float() / 255 - mean) / std) for i in range(0, len(views), batch)])
    gap = float((z.max(1).values - z.mean(1)).mean())
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(TARGET_LOGIT_GAP / gap)
        if head.bias is not None:
            head.bias.mul_(TARGET_LOGIT_GAP / gap)


def main(argv=None) -> dict:
    from logitcache.labels.topk import TopKLogits
    from logitcache.runtime import precision
    from logitcache.teacher import Teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--views", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")

    views = smooth_views(args.views, args.image_size)
    base = Teacher.load(args.teacher, None, 1000, args.image_size, "cpu", 0, precision="fp32")  # calibrated once
    calibrate(base.model, views, base.mean, base.std, args.batch_size)
    state = base.model.state_dict()

    ref = None
    out: dict = {"teacher": args.teacher, "image_size": args.image_size, "views": args.views, "k": args.topk,
                 "device": args.device, "torch": torch.__version__, "host": platform.node(), "precisions": {}}
    rng = np.random.default_rng(1)
    for p in precisions:
        t = Teacher.load(args.teacher, None, 1000, args.image_size, args.device, 0, precision=p)
        t.model.load_state_dict(state)
        t0 = time.perf_counter()
        with torch.inference_mode():
            z = torch.cat([t.logits(views[i:i + args.batch_size]).cpu() for i in range(0, len(views), args.batch_size)])
        seconds = time.perf_counter() - t0
        if ref is None:  # the first precision given is the reference (fp32 by default)
            ref = torch.log_softmax(z.double(), dim=1)
            take_top1 = torch.from_numpy(rng.random(len(views)) < 0.75)
            target = torch.where(take_top1, ref.argmax(1), torch.from_numpy(rng.integers(0, 1000, len(views))))
            out["reference"] = p
            out["mean_top1_prob"] = float(ref.exp().max(1).values.mean())
            out["mean_logit_gap"] = float((z.max(1).values - z.mean(1)).mean())
        tk = TopKLogits.from_logits(z, target, args.topk)
        stored_topk = (tk.logits - tk.lse[:, :1]).to(torch.float16).double()  # value dtype float16, as cached
        stored_target = tk.target_logprob.float().double()
        d_topk = (stored_topk - ref.gather(1, tk.indices)).abs().max(1).values
        d_target = (stored_target - ref.gather(1, target[:, None])[:, 0]).abs()
        ref_top = torch.sort(ref, dim=1, descending=True, stable=True).indices[:, :args.topk]
        same_set = float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(tk.indices, ref_top,
                                                                                      strict=True)]))
        worst = max(float(d_topk.max()), float(d_target.max()))
        out["precisions"][p] = {
            "seconds": seconds,
            "topk_logprob_max": float(d_topk.max()), "topk_logprob_p99": float(d_topk.quantile(0.99)),
            "topk_logprob_median": float(d_topk.median()),
            "target_logprob_max": float(d_target.max()), "target_logprob_p99": float(d_target.quantile(0.99)),
            "target_logprob_median": float(d_target.median()),
            "same_topk_set": same_set, "same_top1": float((tk.indices[:, 0] == ref_top[:, 0]).double().mean()),
            "derived_error": precision.round_up(1.25 * worst), "table_error": precision.MEASURED_ERROR.get(p),
        }
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return out
    print(f"teacher precision vs a float32 teacher: {args.teacher} (seeded, calibrated), {args.views} views at "
          f"{args.image_size} px on {args.device}; mean top-1 prob {out['mean_top1_prob']:.3f}, mean logit gap "
          f"{out['mean_logit_gap']:.1f}")
    print(f"{'precision':9s} {'top-k max':>10s} {'p99':>8s} {'median':>8s} {'target max':>10s} {'p99':>8s} "
          f"{'median':>8s} {'same set':>8s} {'top-1':>6s} {'derived E':>9s} {'table E':>8s} {'s':>6s}")
    for p, r in out["precisions"].items():
        ok = r["table_error"] is not None and r["table_error"] >= r["derived_error"]
        print(f"{p:9s} {r['topk_logprob_max']:10.2e} {r['topk_logprob_p99']:8.2e} {r['topk_logprob_median']:8.2e} "
              f"{r['target_logprob_max']:10.2e} {r['target_logprob_p99']:8.2e} {r['target_logprob_median']:8.2e} "
              f"{r['same_topk_set']:8.3f} {r['same_top1']:6.3f} {r['derived_error']:9.3g} "
              f"{r['table_error']!s:>8s} {r['seconds']:6.1f}" + ("" if ok else "  <- table below the measurement"))
    print("verify --recompute's default tolerance = E[cache precision] + E[recompute precision] + the value "
          "dtype's rounding at each value (runtime/precision.py)")
    return out


if __name__ == "__main__":
    main()
