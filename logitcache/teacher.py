"""The teacher runner, shared by the dump (stage 1), online distillation (stage 2) and `verify --recompute`.

A teacher is a model in eval mode on its device with the normalisation it was trained with; `logits` takes the
uint8 pixels of a batch of views and returns float32 logits whatever precision the body ran in
(``precision``: fp32 | bf16 | fp16, `runtime.precision.teacher_autocast`), so every reduction downstream (top-k,
log-partition, losses) is float32.
"""

from __future__ import annotations

import torch

from logitcache.models.weights import state_dict_digest
from logitcache.models.zoo import build_model, model_normalization
from logitcache.runtime import precision as _precision


class Teacher:
    """A loaded teacher: ``model`` (eval mode, on ``device``), its input ``mean``/``std``, weights ``digest`` and
    the ``precision`` its body runs at."""

    def __init__(self, model: torch.nn.Module, mean, std, device: str, precision: str = "fp32"):
        self.model, self.device = model, device
        self.precision = _precision.check_teacher_precision(precision)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @classmethod
    def load(cls, name: str, weights: str | None, num_classes: int, image_size: int, device: str, seed: int,
             normalization: tuple | None = None, precision: str | None = None) -> Teacher:
        """Build ``name`` with ``weights`` (random from ``seed`` without: tests and benchmarks stay pure functions
        of the seed). ``normalization``: ``(mean, std)``, default the model's own. ``precision``: the body's
        (default: bf16 on a GPU, fp32 elsewhere)."""
        precision = _precision.resolve_teacher_precision(precision, device)
        torch.manual_seed(seed)
        model = build_model(name, num_classes, weights=weights, image_size=image_size)
        model = _precision.prepare_model(model.eval(), device)
        mean, std = normalization if normalization is not None else model_normalization(name)
        return cls(model, mean, std, device, precision)

    @property
    def digest(self) -> str:
        return state_dict_digest(self.model)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, C) of the teacher on uint8 (N, 3, H, W) views (normalised on the device)."""
        x = _precision.normalize_on_device(images_uint8, self.mean, self.std, self.device)
        with _precision.teacher_autocast(self.precision, self.device):
            z = self.model(x)
        return z.float()
