"""Soft labels: `TopKLogits`, a teacher's output kept as top-k logits plus the exact target log-probability and
log-partition — the one place for sparse soft-label math, including the tail rule (`teacher_log_probs`)."""

from logitcache.labels.topk import TopKLogits, teacher_log_probs

__all__ = ["TopKLogits", "teacher_log_probs"]
