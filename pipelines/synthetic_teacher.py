"""A seeded stand-in for a 1000-class ImageNet teacher's logits on augmented training views.

A random-initialised network gives near-uniform outputs, which compress and reconstruct far too well and would
flatter every storage/fidelity figure. This generator instead draws logits with the structure of a trained
classifier: classes sit in 100 super-classes (so confusions concentrate on a few similar classes, as with dog
breeds), each view's feature is its class embedding plus noise, and logits are a scaled cosine similarity plus
small per-class noise. With the defaults (scale 16, noise 1.8) the "teacher" is right on ~75% of views, with a
mean top-1 probability of ~0.68 and a mean top-10 mass of ~0.94 — the range of a ResNet-34 on
RandomResizedCrop training views. The benchmarks print these figures next to every result.
"""

from __future__ import annotations

import torch

#: the benchmarks' two teachers: the default (ResNet-34-like confidence: mean top-10 mass ~0.94) and a heavier-
#: tailed one (less sure: mean top-10 mass ~0.85, mean top-1 prob ~0.57), which stresses the tail rules
TEACHERS = {"default": {}, "heavy": {"scale": 12.3}}


def synthetic_teacher_logits(n: int, num_classes: int = 1000, *, seed: int = 0, scale: float = 16.0,
                             noise: float = 1.8, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, C) float32, targets (n,) int64), a pure function of the arguments."""
    g = torch.Generator().manual_seed(seed)
    n_super = max(num_classes // 10, 1)
    sup = torch.nn.functional.normalize(torch.randn(n_super, dim, generator=g), dim=1)
    sub = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    emb = torch.nn.functional.normalize(sup[torch.arange(num_classes) % n_super] + 0.8 * sub, dim=1)
    y = torch.randint(0, num_classes, (n,), generator=g)
    f = emb[y] + noise * torch.randn(n, dim, generator=g) / dim**0.5
    z = scale * f @ emb.T + 0.3 * torch.randn(n, num_classes, generator=g)
    return z, y


def describe(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5, 10, 20)) -> dict[str, float]:
    p = logits.double().softmax(1)
    out = {"accuracy": float((p.argmax(1) == target).double().mean()), "mean_top1_prob": float(p.max(1).values.mean())}
    for k in ks:
        out[f"mean_top{k}_mass"] = float(p.topk(k, 1).values.sum(1).mean())
    return out
