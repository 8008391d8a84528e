"""ColorJitter (torchvision ``ColorJitter``) as explicit params.

Draw: the order of the four adjustments (a permutation, stored as its index 0..23 in lexicographic order) and
brightness/contrast/saturation factors uniform in [max(0, 1 - x), 1 + x], hue uniform in [-h, h]. Stored
(five int16): ``cj_order``, ``cj_brightness``, ``cj_contrast``, ``cj_saturation`` (factor x 1000, rounded),
``cj_hue`` (x 1000); a setting that is 0 (off) stores 1000 (factor 1) / 0 (hue) and is skipped when applied,
as torchvision skips it. Applied with torchvision's functional ops on the PIL image.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image
from torchvision.transforms.v2 import functional as F

ORDERS = tuple(itertools.permutations(range(4)))
SCALE = 1000


def draw_colorjitter(rng: np.random.Generator, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0) -> list[int]:
    order = int(rng.integers(len(ORDERS)))
    out = [order]
    for x in (brightness, contrast, saturation):
        f = float(rng.uniform(max(0.0, 1 - x), 1 + x)) if x > 0 else 1.0
        out.append(int(round(f * SCALE)))
    out.append(int(round(float(rng.uniform(-hue, hue)) * SCALE)) if hue > 0 else 0)
    return out


def apply_colorjitter(img: Image.Image, params) -> Image.Image:
    order, b, c, s, h = (int(v) for v in params)
    if not 0 <= order < len(ORDERS) or min(b, c, s) < 0 or abs(h) > SCALE // 2:
        raise ValueError(f"ColorJitter params {list(params)} are not valid")
    for fn in ORDERS[order]:
        if fn == 0 and b != SCALE:
            img = F.adjust_brightness(img, b / SCALE)
        elif fn == 1 and c != SCALE:
            img = F.adjust_contrast(img, c / SCALE)
        elif fn == 2 and s != SCALE:
            img = F.adjust_saturation(img, s / SCALE)
        elif fn == 3 and h != 0:
            img = F.adjust_hue(img, h / SCALE)
    return img
