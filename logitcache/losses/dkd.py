"""DKD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation", Eq. 1 and 7), as mdistiller's ``dkd_loss``.

With p = softmax(logits / T) and target class t:

    b = [p_t, 1 − p_t]                                        (binary target / rest distribution)
    p̂_i = p_i / (1 − p_t),  i ≠ t                             (non-target distribution, N(·))
    TCKD = KL(b^T ‖ b^S),   NCKD = KL(p̂^T ‖ p̂^S)
    L_dkd = T² · (1/N) Σ_n (α · TCKD + β · NCKD)

KD itself decomposes as ``KD = TCKD + (1 − p_t^T) · NCKD`` (paper Eq. 1). Everything is computed in log
space: ``log(1 − p_t) = logsumexp_{i≠t} log p_i`` and p̂ = log_softmax over the non-target columns, exact
where mdistiller takes ``log`` of a softmax (−inf at ±50 logits) and subtracts 1000 from the target logit.
mdistiller's ``min(epoch / warmup, 1)`` factor is applied by the training loop, not here.
Score labels use their argmax class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.labels.topk import TopKLogits
from logitcache.losses._labels import (
    check_logits,
    check_target,
    check_temperature,
    dense_teacher_log_probs,
    hard_labels,
    log_softmax_without,
    masked_sum,
    working_dtype,
)


def _binary_log_probs(log_p: Tensor, is_target: Tensor) -> Tensor:
    """(N, 2) log [p_t, 1 − p_t] from full log-probabilities."""
    log_target = masked_sum(log_p, is_target)
    log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def dkd_terms(
    student: Tensor, teacher: Tensor | TopKLogits, target: Tensor, *, alpha: float, beta: float, temperature: float
) -> dict[str, Tensor]:
    """``{"dkd_tckd": α·T²·TCKD, "dkd_nckd": β·T²·NCKD}``, each a batch mean."""
    n, c = check_logits(student)
    check_target(target, n, c)
    t = check_temperature(temperature)
    log_p_s = torch.log_softmax(student.to(working_dtype(student)) / t, dim=1)
    log_p_t = dense_teacher_log_probs(teacher, t, like=log_p_s)
    is_target = torch.nn.functional.one_hot(hard_labels(target), c).bool()

    b_t, b_s = _binary_log_probs(log_p_t, is_target), _binary_log_probs(log_p_s, is_target)
    tckd = (b_t.exp() * (b_t - b_s)).sum(dim=1)

    # N(p) in log space; log_softmax of log-probabilities is the same as of the logits / T
    n_t, n_s = log_softmax_without(log_p_t, is_target), log_softmax_without(log_p_s, is_target)
    nckd = masked_sum(n_t.exp() * (n_t - n_s), ~is_target)
    scale = t * t
    return {"dkd_tckd": alpha * scale * tckd.mean(), "dkd_nckd": beta * scale * nckd.mean()}


def dkd(
    student: Tensor, teacher: Tensor | TopKLogits, target: Tensor, *, alpha: float, beta: float, temperature: float
) -> Tensor:
    """α·TCKD + β·NCKD (both KL form) × T², batch mean; 0-d tensor. See the module docstring."""
    terms = dkd_terms(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature)
    return terms["dkd_tckd"] + terms["dkd_nckd"]
