"""What every loss does with its inputs: argument checks, the float32 working dtype, labels, and the
"drop the target column(s) and renormalise" operation N(·) of the NKD/USKD/DKD papers.

Labels come in two forms: hard labels ``(N,)`` int64, or score labels ``(N, C)`` float (Mixup/CutMix,
each row a distribution). Losses that need *one* class take the argmax of score labels; losses that follow
the released NKD/USKD code for mixed images use the two largest label columns (`label_columns`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from logitcache.labels.topk import TopKLogits, teacher_log_probs


def working_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), otherwise float32 — half inputs are never reduced in half."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_logits(logits: Tensor, what: str = "student") -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"{what} logits must be shaped (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if n < 1 or c < 2:
        raise ValueError(f"{what} logits need N >= 1 rows and C >= 2 classes, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{what} logits must be a floating-point tensor, got {logits.dtype}")
    return n, c


def check_target(target: Tensor, n: int, c: int) -> None:
    if target.dim() == 1 and not target.is_floating_point():
        if target.shape[0] != n:
            raise ValueError(f"target has {target.shape[0]} labels for {n} rows of logits")
        if n:
            _check_label_range(target, c)
    elif target.dim() == 2 and target.is_floating_point():
        if tuple(target.shape) != (n, c):
            raise ValueError(f"score labels must be shaped {(n, c)}, got {tuple(target.shape)}")
    else:
        raise ValueError(
            f"target must be (N,) int64 class indices or (N, C) float scores, got {tuple(target.shape)} {target.dtype}"
        )


def _check_label_range(target: Tensor, c: int) -> None:
    """Every hard label in [0, c), checked without reading the labels back to the host: on a GPU this is a
    device-side assert (reading ``target.min()`` would make every training step wait for the device); on the CPU
    it raises at once, as a ValueError naming the range."""
    ok = ((target >= 0) & (target < c)).all()
    try:
        torch._assert_async(ok, f"hard labels must lie in [0, {c})")
    except RuntimeError:
        lo, hi = int(target.min()), int(target.max())
        raise ValueError(f"hard labels must lie in [0, {c}), got range [{lo}, {hi}]") from None


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return t


def hard_labels(target: Tensor) -> Tensor:
    """(N,) int64: the labels themselves, or the argmax class of score labels."""
    return target.argmax(dim=1) if target.dim() == 2 else target.long()


def label_distribution(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(N, C) label distribution: one-hot for hard labels, the scores themselves for score labels."""
    if target.dim() == 2:
        return target.detach().to(dtype)
    return torch.nn.functional.one_hot(target.long(), num_classes).to(dtype)


def label_columns(target: Tensor) -> tuple[Tensor, Tensor]:
    """The label columns and their values, as the released NKD/USKD code defines them for mixed images.

    Hard labels: one column per row with value 1. Score labels: the two largest columns (``(N, 2)``), value 0
    where a row has a single non-zero score (a pure image in a mixed batch); callers treat such a column as
    absent (weight 0, not removed from the non-target set, not counted in batch means).
    """
    if target.dim() == 2:
        k = min(2, target.shape[1])
        values, columns = torch.topk(target.detach(), k, dim=1, largest=True, sorted=True)
        return columns, values
    columns = target.long()[:, None]
    return columns, torch.ones(columns.shape, dtype=torch.float32, device=target.device)


def column_mask(columns: Tensor, present: Tensor, num_classes: int) -> Tensor:
    """(N, C) bool: True at the label columns that are present."""
    # the columns of one row are distinct (topk), so writing an absent column's False clears nothing
    mask = torch.zeros(columns.shape[0], num_classes, dtype=torch.bool, device=columns.device)
    return mask.scatter_(1, columns, present)


def present_mean(values: Tensor, present: Tensor) -> Tensor:
    """Per-column mean over the batch of ``values`` (N, K), counting only rows where the column is present."""
    count = present.sum(dim=0).clamp(min=1)
    return torch.where(present, values, torch.zeros_like(values)).sum(dim=0) / count


def log_softmax_without(logits: Tensor, drop: Tensor) -> Tensor:
    """N(·) in log space: log_softmax over the columns where ``drop`` (N, C) is False; -inf at dropped columns.

    Exact (no eps, no "-1000" trick). A row whose columns are all dropped keeps its plain log_softmax values;
    callers weight every dropped column by exactly 0 through `masked_sum`.
    """
    has_rest = (~drop).any(dim=1, keepdim=True)
    fill = torch.where(has_rest, float("-inf"), 0.0).to(logits.dtype)
    return torch.log_softmax(torch.where(drop, fill, logits), dim=1)


def masked_sum(values: Tensor, keep: Tensor) -> Tensor:
    """Row sums of ``values`` over ``keep`` columns; dropped columns (possibly 0·-inf) contribute exactly 0."""
    return torch.where(keep, values, torch.zeros_like(values)).sum(dim=1)


def dense_teacher_log_probs(teacher: Tensor | TopKLogits, temperature: float, like: Tensor) -> Tensor:
    """Teacher log-probabilities at ``temperature`` via `logitcache.topk.teacher_log_probs` (the one tail rule),
    checked against the student's shape and moved to its device and working dtype."""
    n, c = like.shape
    if isinstance(teacher, TopKLogits):
        if (len(teacher), teacher.num_classes) != (n, c):
            raise ValueError(f"teacher TopKLogits covers {(len(teacher), teacher.num_classes)}, student is {(n, c)}")
    elif tuple(teacher.shape) != (n, c):
        raise ValueError(f"teacher logits shaped {tuple(teacher.shape)} do not match student logits {(n, c)}")
    return teacher_log_probs(teacher, temperature).to(device=like.device, dtype=like.dtype, non_blocking=True)
