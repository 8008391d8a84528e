"""TrivialAugmentWide (Müller & Hutter 2021) with torchvision's semantics (``transforms.v2.TrivialAugmentWide``,
31 magnitude bins), as explicit params.

Draw: one op uniformly from the 14 below, a magnitude bin uniformly in [0, 31), and for signed ops a negation
with probability 0.5 (torchvision: ``torch.rand(()) <= 0.5``). Stored (two int16): ``ta_op`` = op + 16 *
negated, ``ta_bin`` = the bin. Magnitudes are torchvision's own tables (``torch.linspace`` in float32, the
same numbers), and the op is applied with torchvision's functional ops on the PIL image (Pillow underneath):
Shear ±atan→degrees (0..0.99), Translate ±int(0..32 px), Rotate ±0..135°, Brightness/Color/Contrast/Sharpness
factor 1 ± 0..0.99, Posterize 8..2 bits, Solarize threshold 255·(1..0), AutoContrast, Equalize, Identity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

NUM_BINS = 31
NEG_FLAG = 16
#: torchvision's _AUGMENTATION_SPACE order: (name, magnitudes or None, signed)
TA_OPS = (
    ("Identity", None, False),
    ("ShearX", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("ShearY", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("TranslateX", torch.linspace(0.0, 32.0, NUM_BINS), True),
    ("TranslateY", torch.linspace(0.0, 32.0, NUM_BINS), True),
    ("Rotate", torch.linspace(0.0, 135.0, NUM_BINS), True),
    ("Brightness", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("Color", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("Contrast", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("Sharpness", torch.linspace(0.0, 0.99, NUM_BINS), True),
    ("Posterize", (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / 6))).round().int(), False),
    ("Solarize", torch.linspace(1.0, 0.0, NUM_BINS), False),
    ("AutoContrast", None, False),
    ("Equalize", None, False),
)


def draw_trivialaugment(rng: np.random.Generator) -> list[int]:
    """``[ta_op, ta_bin]`` for one view."""
    op = int(rng.integers(len(TA_OPS)))
    b = int(rng.integers(NUM_BINS))
    negate = bool(rng.random() <= 0.5)
    name, mags, signed = TA_OPS[op]
    if mags is None:
        return [op, 0]
    return [op + (NEG_FLAG if signed and negate else 0), b]


def magnitude(code: int, b: int) -> tuple[str, float]:
    op = code & (NEG_FLAG - 1)
    if not 0 <= op < len(TA_OPS) or not 0 <= b < NUM_BINS or code & ~(2 * NEG_FLAG - 1):
        raise ValueError(f"TrivialAugment params ({code}, {b}) are not a valid op")
    name, mags, _ = TA_OPS[op]
    m = 0.0 if mags is None else float(mags[b])
    return name, -m if code & NEG_FLAG else m


def apply_trivialaugment(img: Image.Image, params, *, interpolation: InterpolationMode, fill=None) -> Image.Image:
    """torchvision's ``_apply_image_or_video_transform`` for one stored (op, bin), on a PIL image."""
    name, m = magnitude(int(params[0]), int(params[1]))
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=interpolation,
                        fill=fill, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        t = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return F.affine(img, angle=0.0, translate=t, scale=1.0, interpolation=interpolation, shear=[0.0, 0.0],
                        fill=fill)
    if name == "Rotate":
        return F.rotate(img, angle=m, interpolation=interpolation, fill=fill)
    if name == "Brightness":
        return F.adjust_brightness(img, brightness_factor=1.0 + m)
    if name == "Color":
        return F.adjust_saturation(img, saturation_factor=1.0 + m)
    if name == "Contrast":
        return F.adjust_contrast(img, contrast_factor=1.0 + m)
    if name == "Sharpness":
        return F.adjust_sharpness(img, sharpness_factor=1.0 + m)
    if name == "Posterize":
        return F.posterize(img, bits=int(m))
    if name == "Solarize":
        return F.solarize(img, threshold=255.0 * m)
    if name == "AutoContrast":
        return F.autocontrast(img)
    return F.equalize(img)
