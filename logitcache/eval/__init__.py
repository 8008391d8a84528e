"""Evaluation: metrics (top-k, NLL, ECE, AURC), `evaluate` (a model over a dataset's eval views) and plots."""

from logitcache.eval.evaluate import evaluate, load_model_for_eval
from logitcache.eval.metrics import ClassificationMetrics

__all__ = ["ClassificationMetrics", "evaluate", "load_model_for_eval"]
