"""USKD (Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
with Normalized Loss and Customized Soft Labels", Eq. 6–13), as cls_KD's ``USKDLoss``.

S = softmax(student), W = softmax(weak) where ``weak`` are the logits of the weak head (a Linear layer on the
pooled mid-network feature, Eq. 8), V the label distribution, t the label column(s).

* Target term (Eq. 6–7):   P_t = S_t² + V_t − mean_batch(S_t²)   (detached, not clamped)
                            L_target = −(1/N) Σ_n Σ_t P_t log S_t
* Weak supervision (Eq. 9): L_weak = −μ (1/N) Σ_n Σ_i V'_i log W_i,   V' = 0.9·V + 0.1/C
  Not detached: it trains the weak head and the backbone below it.
* Zipf non-target labels (Eq. 10–12): rank all C classes (targets included) by a score R, give rank
  position p (0-based, descending R) the value 1/(p+1), drop the target column(s), renormalise to N(Z), and
                            L_non = −(1/N) Σ_n Σ_{i≠t} N(Z_i) log N(S_i)
  with N(S) the softmax over the non-target columns of the student logits (exact, no eps).
* Total (Eq. 13 without L_ori):  α·L_target + β·L_non + L_weak.

The ranking score R, two modes:
  ``rank="paper"``    Eq. 10: R_i = W_i / (1 − W_t) + S_i / (1 − S_t). Computed exactly and order-preservingly
                      in log space, ``log R_i = logaddexp(w_i − lse_{j∉t} w_j, s_i − lse_{j∉t} s_j)`` (w, s
                      the logits), so it stays finite where 1 − S_t rounds to 0.
  ``rank="official"`` the authors' released code, whose second term uses *log*-probabilities:
                      R_i = W_i / (1 − W_t + 1e-6) + log S_i / (1 − log S_t + 1e-6). Since log S_i ≤ 0 and the
                      denominator ≥ 1, this ranks by the student's logits mostly, nudged by W; Eq. 10 weighs the
                      two normalised distributions equally. Reproduces the released code's numbers.
For score labels the label columns are the two largest scores, and W_t, S_t (or log S_t) are summed over
both. A second column whose score is 0 (a pure image in a mixed batch) is treated as absent — weight 0, not
removed from the non-target classes, not counted in the batch mean — where the released code would pick an
arbitrary zero-score class. Ties in R are broken by class index (stable sort).
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import (
    check_logits,
    check_target,
    column_mask,
    label_columns,
    label_distribution,
    log_softmax_without,
    masked_sum,
    present_mean,
    working_dtype,
)

RANK_MODES = ("paper", "official")


def _rank_score(weak: Tensor, student: Tensor, is_target: Tensor, rank: str) -> Tensor:
    """(N, C) score R whose descending order gives the Zipf rank positions (no gradient)."""
    if rank == "paper":
        def normalised_log(logits: Tensor) -> Tensor:  # log(p_i / (1 − p_t)) = z_i − logsumexp_{j∉t} z_j
            return logits - torch.logsumexp(logits.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)

        return torch.logaddexp(normalised_log(weak), normalised_log(student))
    w = torch.softmax(weak, dim=1)
    log_s = torch.log_softmax(student, dim=1)
    w_t = masked_sum(w, is_target)[:, None]
    log_s_t = masked_sum(log_s, is_target)[:, None]
    return w / (1 - w_t + 1e-6) + log_s / (1 - log_s_t + 1e-6)


def zipf_positions(score: Tensor) -> Tensor:
    """(N, C) 0-based position of each class when a row is sorted by descending score (ties: lower index first)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    positions = torch.arange(score.shape[1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def uskd_terms(
    student: Tensor,
    weak: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "paper",
) -> dict[str, Tensor]:
    """``{"uskd_target": α·L_target, "uskd_nontarget": β·L_non, "uskd_weak": L_weak}`` (L_weak includes μ)."""
    if rank not in RANK_MODES:
        raise ValueError(f"uskd rank must be one of {RANK_MODES}, got {rank!r}")
    n, c = check_logits(student)
    if tuple(weak.shape) != (n, c):
        raise ValueError(f"weak-head logits shaped {tuple(weak.shape)} do not match student logits {(n, c)}")
    check_target(target, n, c)
    dtype = working_dtype(student, weak)
    s, w = student.to(dtype), weak.to(dtype)
    columns, values = label_columns(target)
    values = values.to(dtype)
    present = values > 0
    is_target = column_mask(columns, present, c)

    # soft target label P_t (Eq. 6) and the target loss (Eq. 7)
    log_s = torch.log_softmax(s, dim=1)
    log_s_t = log_s.gather(1, columns)
    s_t2 = log_s_t.detach().exp() ** 2
    p_t = torch.where(present, s_t2 + values - present_mean(s_t2, present), torch.zeros_like(s_t2))
    loss_target = -(p_t * log_s_t).sum(dim=1).mean()

    # weak supervision (Eq. 9), smoothed labels
    smooth = 0.9 * label_distribution(target, c, dtype) + 0.1 / c
    loss_weak = -mu * (smooth * torch.log_softmax(w, dim=1)).sum(dim=1).mean()

    # Zipf soft non-target labels (Eq. 10–12)
    with torch.no_grad():
        positions = zipf_positions(_rank_score(w.detach(), s.detach(), is_target, rank))
        zipf = torch.where(is_target, 0.0, 1.0 / (positions + 1).to(dtype))
        zipf = zipf / zipf.sum(dim=1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
    loss_non = -masked_sum(zipf * log_softmax_without(s, is_target), ~is_target).mean()

    return {"uskd_target": alpha * loss_target, "uskd_nontarget": beta * loss_non, "uskd_weak": loss_weak}


def uskd(
    student: Tensor,
    weak: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "paper",
) -> Tensor:
    """α·L_target + β·L_non + L_weak (Eq. 13 without the CE term); 0-d tensor. See the module docstring."""
    return sum(uskd_terms(student, weak, target, alpha=alpha, beta=beta, mu=mu, rank=rank).values())
