"""Models by name (`zoo`: torchvision, ``timm:NAME``, ours), the small nets of the demo (`small`), USKD's weak
head (`weak_head`) and weight loading (`weights`: the one ``torch.load``, always ``weights_only=True``)."""

from logitcache.models.weak_head import WeakHeadModel
from logitcache.models.weights import load_checkpoint, load_weights
from logitcache.models.zoo import attach_weak_head, available_models, build_model, model_normalization, model_spec

__all__ = ["WeakHeadModel", "attach_weak_head", "available_models", "build_model", "load_checkpoint", "load_weights",
           "model_normalization", "model_spec"]
