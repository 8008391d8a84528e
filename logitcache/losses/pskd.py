"""PS-KD (Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets", Eq. 4–5),
as the released PS-KD-Pytorch ``Custom_CrossEntropy_PSKD`` with the soft targets of its ``main.py``.

    y_soft = (1 − α_t) · y + α_t · p_prev,      α_t = α_T · (epoch + 1) / E   (epoch 0-based)
    L_pskd = −(1/N) Σ_n Σ_c y_soft,c log S_c

p_prev is the model's own softmax on the same sample in the previous epoch; in the first epoch the released
code uses the one-hot label (pass ``prev_probs=None``). L_pskd *replaces* the CE term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import check_logits, check_target, label_distribution, working_dtype


def pskd_alpha(epoch: int, epochs: int, alpha_T: float) -> float:  # noqa: N803 (the paper's name)
    """α_t = α_T · (epoch + 1) / epochs for a 0-based ``epoch`` (never below 0)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return max(0.0, float(alpha_T) * (epoch + 1) / epochs)


def pskd(student: Tensor, target: Tensor, prev_probs: Tensor | None, *, alpha_t: float) -> Tensor:
    """PS-KD cross-entropy with progressively refined targets; 0-d tensor. ``prev_probs`` (N, C) dense
    probabilities of the previous epoch, or None in the first epoch (the label is used)."""
    n, c = check_logits(student)
    check_target(target, n, c)
    s = student.to(working_dtype(student))
    y = label_distribution(target, c, s.dtype)
    if prev_probs is None:
        prev = y
    else:
        if tuple(prev_probs.shape) != (n, c):
            raise ValueError(f"prev_probs shaped {tuple(prev_probs.shape)} do not match student logits {(n, c)}")
        prev = prev_probs.detach().to(device=s.device, dtype=s.dtype, non_blocking=True)
    soft = (1.0 - alpha_t) * y + alpha_t * prev
    return -(soft * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
