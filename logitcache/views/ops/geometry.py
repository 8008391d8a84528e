"""Geometric operations on uint8 (3, H, W) images: the RandomResizedCrop box (drawn from the view's Generator),
the pad-crop window, Pillow's antialiased bilinear resize (bit-identical on every CPU), flips, normalisation."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from logitcache.errors import RecipeError


def _random_resized_crop_box(rng, height, width, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, line for line, with ``rng`` for torch's global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: a central crop with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _window(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The image shifted so that source pixel (top, left) lands at (0, 0); uncovered pixels are zero."""
    _, H, W = image.shape
    out = torch.zeros((H, W, 3), dtype=torch.uint8).permute(2, 0, 1)  # channels-last, like decoded images
    y0, y1, x0, x1 = max(top, 0), min(top + H, H), max(left, 0), min(left + W, W)
    out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, h, w) -> new uint8 (3, height, width) with Pillow's antialiased bilinear filter."""
    return _from_pil(_to_pil(image).resize((width, height), Image.Resampling.BILINEAR))


def _to_pil(x: torch.Tensor) -> Image.Image:
    """uint8 (3, h, w) -> an RGB image, one copy of the region. A window of channels-last memory (decoded images
    and crops of them) is unpacked by PIL row by row from where it lies, into an uninitialised image."""
    _, h, w = x.shape
    rows = x.stride(1)
    if h and w and x.stride(0) == 1 and x.stride(2) == 3 and rows >= 3 * w:
        flat = np.lib.stride_tricks.as_strided(x.permute(1, 2, 0).numpy(), ((h - 1) * rows + 3 * w,), (1,))
        im = Image.new("RGB", (w, h), None)
        im.frombytes(flat, "raw", ("RGB", rows, 1))
        return im
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def _from_pil(im: Image.Image) -> torch.Tensor:
    """An RGB image -> uint8 (3, H, W) in contiguous planes (PIL packs each channel; batches stack with memcpy)."""
    planes = bytearray(b"".join(im.tobytes("raw", c) for c in "RGB"))
    return torch.frombuffer(planes, dtype=torch.uint8).view(3, im.height, im.width)


def _check_image(image) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        what = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise RecipeError(f"views take uint8 (3, H, W) RGB tensors, got {what}")


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as float32, for uint8 (N, C, H, W) or (C, H, W); mean/std per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


