"""NKD (Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
with Normalized Loss and Customized Soft Labels", Eq. 4), as cls_KD's ``NKDLoss``.

    L_nkd = −T_t log S_t  −  γ · λ² · Σ_{i≠t} N(T_i^λ) log N(S_i^λ)

T_t and S_t are probabilities at temperature 1 (no λ; T_t detached). N(·) removes the target column exactly
and renormalises over the other C − 1 classes: ``N(S^λ) = softmax(s_{i≠t} / λ)`` and, on the teacher side,
``N(T^λ) = softmax over i≠t of log T^λ`` — the teacher log-probabilities from
`logitcache.topk.teacher_log_probs` are the logits / λ shifted by one constant per row, so renormalising them
is exact and a cached `TopKLogits` teacher follows the documented tail rule. λ² scales only the non-target
term. Score labels use their argmax class (as the released code does). The plain CE term (Eq. 5) is the
training loop's.
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


def nkd_terms(
    student: Tensor, teacher: Tensor | TopKLogits, target: Tensor, *, gamma: float = 1.5, temperature: float = 1.0
) -> dict[str, Tensor]:
    """``{"nkd_target": −mean T_t log S_t, "nkd_nontarget": −γλ² mean Σ N(T^λ) log N(S^λ)}``."""
    n, c = check_logits(student)
    check_target(target, n, c)
    lam = check_temperature(temperature)
    s = student.to(working_dtype(student))
    labels = hard_labels(target)[:, None]
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, labels, True)

    log_s_t = torch.log_softmax(s, dim=1).gather(1, labels)[:, 0]
    teacher_t = dense_teacher_log_probs(teacher, 1.0, like=s).gather(1, labels)[:, 0].exp()
    target_term = -(teacher_t * log_s_t).mean()

    n_t = log_softmax_without(dense_teacher_log_probs(teacher, lam, like=s), is_target)
    n_s = log_softmax_without(s / lam, is_target)
    nontarget = masked_sum(n_t.exp() * n_s, ~is_target)
    return {"nkd_target": target_term, "nkd_nontarget": -gamma * lam * lam * nontarget.mean()}


def nkd(
    student: Tensor, teacher: Tensor | TopKLogits, target: Tensor, *, gamma: float = 1.5, temperature: float = 1.0
) -> Tensor:
    """NKD loss (paper Eq. 4) without the CE term; 0-d tensor, batch mean. See the module docstring."""
    terms = nkd_terms(student, teacher, target, gamma=gamma, temperature=temperature)
    return terms["nkd_target"] + terms["nkd_nontarget"]
