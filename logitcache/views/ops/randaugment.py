"""RandAugment with timm's ``rand-m{M}-mstd{S}-inc1`` semantics, as explicit parameters.

timm (``timm/data/auto_augment.py``, ``rand_augment_transform``): per image, ``num_layers`` ops are drawn
uniformly *with replacement* from the 15-op "increasing" set below; each is applied with probability ``prob``
(0.5); its magnitude is ``gauss(M, S)`` clipped to [0, 10]; signed ops negate their argument with probability
0.5. Geometric ops resample with the recipe's filter and fill the uncovered area with the dataset mean colour.

Stored per layer (two int16): ``ra_op{i}`` = 0 when the layer did nothing, else ``op + 1 + 16 * negated``;
``ra_mag{i}`` = the magnitude in tenths (0..100). The magnitude is quantised to 0.1 when drawn (the stored
value is the truth; timm's continuous draw rounded to a tenth), which is what keeps the params compact.
Version 2 stores ``ra_mag{i}`` = zigzag(tenths - 10·M) (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...; the same tenths, a
code whose bits a bit-shuffling compressor packs tightly) and 0 for AutoContrast/Equalize/Invert (no magnitude),
and puts the applied layers first (a skipped layer is a no-op, so the same ops apply in the same order).

Level → argument mappings (``m`` = magnitude, L = m / 10; ``±`` = negated when stored so):
    AutoContrast, Equalize, Invert          no argument
    Rotate                ±30·L degrees, bicubic (recipe), fill = mean colour
    PosterizeIncreasing   keep 4 - int(4·L) bits (no-op when >= 8)
    SolarizeIncreasing    threshold 256 - min(256, int(256·L))
    SolarizeAdd           add min(128, int(110·L)) below 128
    Color/Contrast/Brightness/SharpnessIncreasing   factor max(0.1, 1 ± 0.9·L) (PIL ImageEnhance)
    ShearX, ShearY        ±0.3·L (PIL affine (1, f, 0, 0, 1, 0) / (1, 0, 0, f, 1, 0))
    TranslateXRel/YRel    ±0.45·L of the width/height, in pixels (PIL affine)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

#: timm's _RAND_INCREASING_TRANSFORMS, in timm's order (the stored op index is a position in this tuple)
RA_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_SIGNED = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                     "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_ARG_FREE = frozenset({"AutoContrast", "Equalize", "Invert"})
_LEVEL_DENOM = 10.0
TRANSLATE_PCT = 0.45
NEG_FLAG = 16


def draw_randaugment(rng: np.random.Generator, *, num_layers: int = 2, magnitude: float = 9.0,
                     magnitude_std: float = 0.5, prob: float = 0.5, magnitude_max: float = 10.0,
                     coded: bool = False) -> list[int]:
    """``[ra_op0, ra_mag0, ra_op1, ra_mag1, ...]`` for one view (see the module doc for the encoding).
    ``coded`` (recipe version 2): the magnitude is stored as zigzag(tenths - 10·M), 0 for ops without one, and
    the applied layers come first (same ops in the same order; the skipped ones are the trailing zeros)."""
    out: list[int] = []
    skipped = 0
    for _ in range(num_layers):
        op = int(rng.integers(len(RA_OPS)))
        applied = rng.random() <= prob  # timm skips when random() > prob
        m = float(rng.normal(magnitude, magnitude_std)) if magnitude_std > 0 else float(magnitude)
        m_tenths = int(round(min(max(m, 0.0), magnitude_max) * 10))
        negate = rng.random() > 0.5  # timm's _randomly_negate
        if not applied:
            skipped += 1
            continue
        if coded:
            m_tenths = 0 if RA_OPS[op] in _ARG_FREE else _zigzag(m_tenths - int(round(magnitude * 10)))
        if not coded:
            out += [0, 0] * skipped  # version 1: each layer in its own slot
            skipped = 0
        out += [op + 1 + (NEG_FLAG if negate and RA_OPS[op] in _SIGNED else 0), m_tenths]
    return out + [0, 0] * (num_layers - len(out) // 2)


def _zigzag(d: int) -> int:
    return 2 * d if d >= 0 else -2 * d - 1


def decode_op(code: int, mag_tenths: int, center: float | None = None) -> tuple[str, float, bool] | None:
    """(op name, magnitude, negated) of one stored layer, or None for a layer that did nothing. ``center``
    (version 2): the recipe's magnitude M; the stored value is zigzag(tenths - 10·M)."""
    if code == 0:
        return None
    if center is not None:
        mag_tenths = int(round(center * 10)) + (mag_tenths // 2 if mag_tenths % 2 == 0 else -(mag_tenths + 1) // 2)
    op = (code & (NEG_FLAG - 1)) - 1
    if not 0 <= op < len(RA_OPS) or not 0 <= mag_tenths <= 1000 or code & ~(2 * NEG_FLAG - 1):
        raise ValueError(f"RandAugment params ({code}, {mag_tenths}) are not a valid op")
    return RA_OPS[op], mag_tenths / 10.0, bool(code & NEG_FLAG)


def level_args(name: str, m: float, negate: bool) -> tuple:
    """timm's LEVEL_TO_ARG for the increasing set, with the negation given instead of drawn."""
    sgn = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sgn * ((m / _LEVEL_DENOM) * 30.0),)
    if name == "PosterizeIncreasing":
        return (4 - int((m / _LEVEL_DENOM) * 4),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int((m / _LEVEL_DENOM) * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int((m / _LEVEL_DENOM) * 110)),)
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        level = (m / _LEVEL_DENOM) * 0.9
        return (max(0.1, 1.0 + sgn * level),)
    if name in ("ShearX", "ShearY"):
        return (sgn * ((m / _LEVEL_DENOM) * 0.3),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sgn * ((m / _LEVEL_DENOM) * TRANSLATE_PCT),)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_op(img: Image.Image, name: str, args: tuple, *, fill: tuple[int, ...], resample: int) -> Image.Image:
    """One RandAugment op on a PIL image, as timm's op functions do it (Pillow, no RNG)."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(args[0], resample=resample, fillcolor=fill)
    if name == "PosterizeIncreasing":
        bits = args[0]
        if bits >= 8:
            return img
        # Pillow >= 12 refuses bits=0 (timm then raises at magnitude 10); older Pillow, and this, keep no bit
        mask = ~(2 ** (8 - bits) - 1) & 0xFF
        return img.point([i & mask for i in range(256)] * len(img.getbands()))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, args[0])
    if name == "SolarizeAdd":
        add, thresh = args[0], 128
        lut = [min(255, i + add) if i < thresh else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    if name == "ColorIncreasing":
        return ImageEnhance.Color(img).enhance(args[0])
    if name == "ContrastIncreasing":
        return ImageEnhance.Contrast(img).enhance(args[0])
    if name == "BrightnessIncreasing":
        return ImageEnhance.Brightness(img).enhance(args[0])
    if name == "SharpnessIncreasing":
        return ImageEnhance.Sharpness(img).enhance(args[0])
    if name == "ShearX":
        matrix = (1, args[0], 0, 0, 1, 0)
    elif name == "ShearY":
        matrix = (1, 0, 0, args[0], 1, 0)
    elif name == "TranslateXRel":
        matrix = (1, 0, args[0] * img.size[0], 0, 1, 0)
    elif name == "TranslateYRel":
        matrix = (1, 0, 0, 0, 1, args[0] * img.size[1])
    else:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def apply_randaugment(img: Image.Image, params, *, fill: tuple[int, ...], resample: int,
                      center: float | None = None) -> Image.Image:
    """Apply the stored layers ``[ra_op0, ra_mag0, ra_op1, ra_mag1, ...]`` in order (``center``: `decode_op`)."""
    for code, mag in zip(params[0::2], params[1::2], strict=True):
        op = decode_op(int(code), int(mag), center)
        if op is not None:
            name, m, negate = op
            img = apply_op(img, name, level_args(name, m, negate), fill=fill, resample=resample)
    return img
