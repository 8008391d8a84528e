"""Geometric operations on uint8 (3, H, W) images: the RandomResizedCrop box (drawn from the view's Generator),
the pad-crop window, the two antialiased resizes (Pillow's on PIL images; torch's on uint8 tensors, as
torchvision v2 resizes tensors: both integer arithmetic, the same bytes on every CPU), flips, normalisation."""

from __future__ import annotations

import math
from functools import lru_cache

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
    return _fallback_box(height, width, ratio)


def _fallback_box(height, width, ratio) -> tuple[int, int, int, int]:
    """torchvision's fallback: a central crop with the aspect ratio clamped into `ratio`."""
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


# ------------------------------------------------------------------ the coded RandomResizedCrop (recipe version 2)
CROP_AREA_CODES = 64  # area fraction: midpoints of `scale` cut into 64
CROP_RATIO_CODES = 16  # aspect ratio: midpoints of log `ratio` cut into 16
CROP_POS_CODES = 64  # top / left: 0..63 spread over the free range [0, H - h] / [0, W - w]
CROP_FALLBACK = CROP_AREA_CODES  # crop_area of torchvision's centre-crop fallback (the other codes 0)


@lru_cache(maxsize=64)
def log_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """The ``n`` midpoints of [log lo, log hi] exponentiated, ``lo·(hi/lo)^((2j+1)/(2n))`` (``n`` a power of 2),
    computed with multiplications and square roots only: IEEE 754 rounds those exactly, so every machine gets the
    same floats (``math.exp``/``pow`` come from the C library and may differ in the last bit)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"log_grid needs a power of 2, got {n}")
    root, m = hi / lo, 2 * n
    while m > 1:
        root, m = math.sqrt(root), m // 2
    out, x = [], lo * root
    for _ in range(n):
        out.append(x)
        x = x * root * root
    return tuple(out)


def lin_grid(lo: float, hi: float, n: int, k: int) -> float:
    """Midpoint ``k`` of [lo, hi] cut into ``n``."""
    return lo + (hi - lo) * (2 * k + 1) / (2 * n)


def grid_position(code: int, free: int, n: int) -> int:
    """Code 0..n-1 -> a position in 0..free (integers only): the midpoint of the code's n-th of [0, free + 1),
    floor((2 code + 1)(free + 1) / 2n). Uniform codes give the free + 1 positions equal weight (±1 code of n)
    on a narrow range, where rounding onto the ends would halve theirs; on a wide one, n evenly spread positions."""
    return (2 * code + 1) * (free + 1) // (2 * n)


def _coded_size(area_code: int, ratio_code: int, height: int, width: int, scale, ratio) -> tuple[int, int]:
    target_area = height * width * lin_grid(scale[0], scale[1], CROP_AREA_CODES, area_code)
    r = log_grid(ratio[0], ratio[1], CROP_RATIO_CODES)[ratio_code]
    return int(round(math.sqrt(target_area / r))), int(round(math.sqrt(target_area * r)))


def draw_crop_codes(rng, height, width, scale, ratio) -> list[int]:
    """torchvision's RandomResizedCrop on the grid: up to 10 attempts of an area code and an aspect code (uniform,
    i.e. the continuous draws quantised to the grid's midpoints); the first box that fits gets a position code
    for top and left. ``[crop_area, crop_ratio, crop_y, crop_x]``; none fits: ``[CROP_FALLBACK, 0, 0, 0]``."""
    for _ in range(10):
        a, r = int(rng.integers(CROP_AREA_CODES)), int(rng.integers(CROP_RATIO_CODES))
        h, w = _coded_size(a, r, height, width, scale, ratio)
        if 0 < w <= width and 0 < h <= height:
            return [a, r, int(rng.integers(CROP_POS_CODES)), int(rng.integers(CROP_POS_CODES))]
    return [CROP_FALLBACK, 0, 0, 0]


def crop_box_from_codes(codes, height, width, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the stored crop codes on a ``height`` x ``width`` image; ValueError when they do not
    fit it (a replay against another image)."""
    a, r, y, x = (int(v) for v in codes)
    if a == CROP_FALLBACK and r == y == x == 0:
        return _fallback_box(height, width, ratio)
    if not (0 <= a < CROP_AREA_CODES and 0 <= r < CROP_RATIO_CODES and 0 <= y < CROP_POS_CODES
            and 0 <= x < CROP_POS_CODES):
        raise ValueError(f"crop codes {list(codes)} are not valid")
    h, w = _coded_size(a, r, height, width, scale, ratio)
    if not (0 < w <= width and 0 < h <= height):
        raise ValueError(f"crop codes {list(codes)} give a {h}x{w} box, which does not fit a {height}x{width} image")
    return grid_position(y, height - h, CROP_POS_CODES), grid_position(x, width - w, CROP_POS_CODES), h, w


def _window(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The image shifted so that source pixel (top, left) lands at (0, 0); uncovered pixels are zero."""
    _, H, W = image.shape
    out = torch.zeros((H, W, 3), dtype=torch.uint8).permute(2, 0, 1)  # channels-last, like decoded images
    y0, y1, x0, x1 = max(top, 0), min(top + H, H), max(left, 0), min(left + W, W)
    if y1 > y0 and x1 > x0:  # else the window lies wholly in the padding (an image smaller than the pad)
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, h, w) -> new uint8 (3, height, width) with Pillow's antialiased bilinear filter."""
    return _from_pil(_to_pil(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_tensor(image: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (3, h, w) -> new uint8 (3, height, width), contiguous planes: torch's antialiased ``mode`` filter on
    the uint8 tensor itself, which is what torchvision's v2 ``resize``/``resized_crop`` do with uint8 tensors.
    Why it may replay a cache made elsewhere: torch's uint8 antialiased kernels compute in fixed-point integers
    (int16 weights), and the generic kernel (``ATEN_CPU_CAPABILITY=default``, the one ARM CPUs run) gives the
    same bytes as the AVX2/AVX512 ones (tests/test_views.py checks it in a subprocess on every run). A crop of a
    channels-last image is read where it lies (no copy); 3-4x faster than Pillow's resize of the same crop."""
    out = torch.nn.functional.interpolate(image[None], size=(height, width), mode=mode, antialias=True,
                                          align_corners=False)[0]
    return out.contiguous()  # channels-last input comes out as planes already; this copies only in other cases


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
    planes = bytearray().join(im.tobytes("raw", c) for c in "RGB")  # one copy: bytearray's join
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


