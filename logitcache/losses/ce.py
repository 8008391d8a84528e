"""The plain cross-entropy term that every CE-keeping method adds (hard or score labels).

    L_CE = -(1/N) Σ_n Σ_c y_nc log S_nc,   S = softmax(student)

with y one-hot for hard labels and the label scores themselves for Mixup/CutMix score labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import check_logits, check_target, label_distribution, working_dtype


def cross_entropy(student: Tensor, target: Tensor) -> Tensor:
    """Batch-mean CE in float32 (float64 stays float64); 0-d tensor."""
    n, c = check_logits(student)
    check_target(target, n, c)
    s = student.to(working_dtype(student))
    y = label_distribution(target, c, s.dtype)
    return -(y * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
