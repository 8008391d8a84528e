"""Tf-KD_reg (Yuan et al., CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
Eq. 9–10), as the released ``loss_kd_regularization``.

A hand-made "virtual teacher" u puts ``correct_prob`` on the label and spreads the rest uniformly,
``u_c = correct_prob`` for c = y and ``(1 − correct_prob) / (C − 1)`` otherwise; it is softened once more as
p^d = softmax(u / T) (the released code applies the temperature to these probabilities, not to logits), and

    L_tf-kd = multiplier · KLDivLoss_mean(log_softmax(s), p^d)
            = multiplier · (1/(N·C)) Σ_n Σ_c p^d_c (log p^d_c − log S_c)

``nn.KLDivLoss()``'s default ``'mean'`` reduction divides by N·C, which is why the released multiplier is 100.
The loop combines it as ``(1 − α)·CE + α·L_tf-kd`` (α = 0.1). Score labels y give
``u = correct_prob·y + (1 − correct_prob)/(C − 1)·(1 − y)`` (the same u for one-hot y).
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import (
    check_logits,
    check_target,
    check_temperature,
    label_distribution,
    working_dtype,
)


def tf_kd(
    student: Tensor, target: Tensor, *, temperature: float = 20.0, correct_prob: float = 0.99, multiplier: float = 100.0
) -> Tensor:
    """Tf-KD_reg term as released; 0-d tensor. See the module docstring."""
    n, c = check_logits(student)
    check_target(target, n, c)
    t = check_temperature(temperature)
    if not 0.0 <= float(correct_prob) <= 1.0:
        raise ValueError(f"tf-kd correct_prob must lie in [0, 1], got {correct_prob}")
    s = student.to(working_dtype(student))
    y = label_distribution(target, c, s.dtype)
    virtual_teacher = correct_prob * y + (1.0 - correct_prob) / (c - 1) * (1.0 - y)
    log_p = torch.log_softmax(virtual_teacher / t, dim=1)
    kl = log_p.exp() * (log_p - torch.log_softmax(s, dim=1))
    return multiplier * kl.sum() / (n * c)
