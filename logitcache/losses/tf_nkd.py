"""tf-NKD (Yang et al., "Rethinking Knowledge Distillation via Cross-Entropy", arXiv 2208.10139, Eq. 8),
as the ``tf_nkd`` branch of cls_KD's ClassificationDistiller (commit de48db4).

    L_tf-NKD = −log S_t − (S_t + V_t − mean_batch(S_t)) · log S_t

The first term is the plain CE (the training loop's); this function returns the second, with the weight
``S_t + V_t − mean(S_t)`` detached. V_t is the label value of class t (1 for hard labels). For score labels
there is one such term for each of the two largest label columns, as in the released code; a column whose
score is 0 (a pure image in a mixed batch) gets weight 0 and is left out of that column's batch mean
(the released code would average the probability of an arbitrary zero-score class there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.losses._labels import check_logits, check_target, label_columns, present_mean, working_dtype

_TERM_NAMES = ("tf_nkd", "tf_nkd_second")


def tf_nkd_terms(student: Tensor, target: Tensor) -> dict[str, Tensor]:
    """``{"tf_nkd": ...}`` (plus ``"tf_nkd_second"`` for score labels), each a batch mean."""
    n, c = check_logits(student)
    check_target(target, n, c)
    s = student.to(working_dtype(student))
    columns, values = label_columns(target)
    values = values.to(s.dtype)
    present = values > 0
    log_s_t = torch.log_softmax(s, dim=1).gather(1, columns)
    s_t = log_s_t.detach().exp()
    weight = torch.where(present, s_t + values - present_mean(s_t, present), torch.zeros_like(s_t))
    terms = -(weight * log_s_t).mean(dim=0)
    return {_TERM_NAMES[i]: terms[i] for i in range(columns.shape[1])}


def tf_nkd(student: Tensor, target: Tensor) -> Tensor:
    """tf-NKD's soft-target term(s) of Eq. 8 without the CE term; 0-d tensor."""
    return sum(tf_nkd_terms(student, target).values())
