"""KD (Hinton et al., 2015, "Distilling the knowledge in a neural network"), as mdistiller's ``kd_loss``.

    L_kd = T² · (1/N) Σ_n Σ_c p_T,c (log p_T,c − log p_S,c),   p = softmax(logits / T)

This is the KL form: it equals the CE form of the NKD paper's Eq. 2–3,
``−T_t log S_t − Σ_{i≠t} T_i log S_i`` (times T²), minus the teacher entropy T²·H(p_T), so it is ≥ 0 and
its gradient is the CE form's. The teacher side comes from `logitcache.topk.teacher_log_probs`, so a cached
`TopKLogits` teacher uses the documented tail rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitcache.labels.topk import TopKLogits
from logitcache.losses._labels import check_logits, check_temperature, dense_teacher_log_probs, working_dtype


def kd(student: Tensor, teacher: Tensor | TopKLogits, *, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) summed over classes, batch mean, × T²; 0-d float32 tensor."""
    check_logits(student)
    t = check_temperature(temperature)
    log_p_s = torch.log_softmax(student.to(working_dtype(student)) / t, dim=1)
    log_p_t = dense_teacher_log_probs(teacher, t, like=log_p_s)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)
