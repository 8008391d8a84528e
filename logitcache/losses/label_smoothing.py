"""Label smoothing (Szegedy et al., CVPR 2016, "Rethinking the Inception Architecture", §7), torch/mmcls convention.

    q = (1 − ε) · y + ε / C        (the uniform part also covers the true class, as in
                                    ``torch.nn.functional.cross_entropy(label_smoothing=ε)``)
    L_ls = −(1/N) Σ_n Σ_c q_c log S_c

y is one-hot or the score labels. L_ls *replaces* the CE term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import check_logits, check_target, label_distribution, working_dtype


def label_smoothing(student: Tensor, target: Tensor, *, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy against ``(1 − ε)·y + ε/C``, batch mean; 0-d tensor."""
    if not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1], got {epsilon}")
    n, c = check_logits(student)
    check_target(target, n, c)
    s = student.to(working_dtype(student))
    q = (1.0 - epsilon) * label_distribution(target, c, s.dtype) + epsilon / c
    return -(q * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
