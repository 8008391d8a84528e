"""logitcache: run a teacher once over replayable augmented views, cache its top-k logits, train students from them."""

__version__ = "0.1.0"

from logitcache.labels.topk import TopKLogits  # noqa: E402

__all__ = ["TopKLogits", "__version__"]
