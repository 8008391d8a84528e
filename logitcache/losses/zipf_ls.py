"""Zipf's label smoothing (Liang et al., ECCV 2022, "Efficient One Pass Self-distillation with Zipf's Label
Smoothing"), the KL term of the released ``zipf_loss`` (rank_zipf, power 1, no loss mask).

Rank all C classes (the target included) by a score with competition ranking ("min": tied classes share the
best rank r ∈ {1, 2, ...}), give each class 1/r, drop the target column, renormalise to Z, and

    L_zipf = (1/N) Σ_n Σ_{i≠t} Z_i (log Z_i − log N(S)_i),   N(S) = softmax of the non-target student logits.

The score is the per-pixel vote count when ``votes`` (N, P) is given — ``votes[n, p]`` is the class that
spatial position p of the last feature map votes for (argmax of the classifier applied to that pixel's
feature) — or the detached student logits when ``votes`` is None. The training loop adds λ·L_zipf to CE.
Score labels use their argmax class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import (
    check_logits,
    check_target,
    hard_labels,
    log_softmax_without,
    masked_sum,
    working_dtype,
)


def competition_rank(score: Tensor) -> Tensor:
    """(N, C) 1-based "min" rank by descending score: 1 + the number of classes with a strictly larger score."""
    ascending = torch.sort(score, dim=1).values.contiguous()
    not_larger = torch.searchsorted(ascending, score.contiguous(), right=True)
    return score.shape[1] - not_larger + 1


def vote_counts(votes: Tensor, num_classes: int) -> Tensor:
    """(N, C) how many spatial positions vote for each class."""
    if votes.dim() != 2 or votes.is_floating_point():
        raise ValueError(f"votes must be (N, P) integer class indices, got {tuple(votes.shape)} {votes.dtype}")
    if votes.numel() and (int(votes.min()) < 0 or int(votes.max()) >= num_classes):
        raise ValueError(f"votes must lie in [0, {num_classes}), got [{int(votes.min())}, {int(votes.max())}]")
    counts = torch.zeros(votes.shape[0], num_classes, device=votes.device)
    return counts.scatter_add_(1, votes.long(), torch.ones(votes.shape, device=votes.device))


def zipf_ls(student: Tensor, target: Tensor, *, votes: Tensor | None = None) -> Tensor:
    """Zipf's LS KL term, batch mean; 0-d tensor. See the module docstring."""
    n, c = check_logits(student)
    check_target(target, n, c)
    s = student.to(working_dtype(student))
    is_target = torch.nn.functional.one_hot(hard_labels(target), c).bool()
    with torch.no_grad():
        if votes is None:
            score = s.detach()
        else:
            if votes.shape[0] != n:
                raise ValueError(f"votes has {votes.shape[0]} rows for {n} rows of logits")
            score = vote_counts(votes.to(s.device), c)
        zipf = torch.where(is_target, 0.0, 1.0 / competition_rank(score).to(s.dtype))
        zipf = zipf / zipf.sum(dim=1, keepdim=True)
        log_zipf = torch.log(torch.where(is_target, 1.0, zipf))
    kl = masked_sum(zipf * (log_zipf - log_softmax_without(s, is_target)), ~is_target)
    return kl.mean()
