"""The one mixed-precision / memory-format policy, used by the teacher runner, the training step and evaluation.

On a GPU the model runs channels_last under bfloat16 autocast and its outputs are cast to float32 before any
reduction (softmax, top-k, losses, metrics); on a CPU everything runs in float32 as given.
"""

from __future__ import annotations

import contextlib

import torch


def is_cuda(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


def autocast(device: str | torch.device):
    """The autocast context for a forward pass on ``device`` (bf16 on GPUs, none on CPUs)."""
    if is_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a model to ``device`` in the policy's memory format (channels_last on GPUs)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if is_cuda(device) else model


def prepare_input(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A normalised input batch in the policy's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if is_cuda(device) else x


def normalize_on_device(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        device: str | torch.device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std`` on ``device`` (copied without blocking), in the
    policy's memory format. ``mean``/``std`` are (1, 3, 1, 1) tensors on ``device``."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return prepare_input(x, device)
