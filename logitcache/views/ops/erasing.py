"""RandomErasing (Zhong et al.; timm's ``RandomErasing`` / torchvision's ``RandomErasing``) as explicit params.

Draw (on the S x S view, after the other ops): with probability ``p``, up to 10 attempts of area
``uniform(min_area, max_area) * S²`` and aspect ``exp(uniform(log r0, log r1))``; ``h = round(sqrt(a·r))``,
``w = round(sqrt(a/r))``; the first box with ``h < S`` and ``w < S`` is placed at ``top ~ U{0..S-h}``,
``left ~ U{0..S-w}``. No box fits: nothing is erased (both libraries do the same).

Stored (five int16): ``erase_top, erase_left, erase_height, erase_width`` (all 0: not erased) and ``erase_seed``
(0..32767). Fill modes:
  ``pixel`` (timm ``re_mode='pixel'``, DeiT's): per-pixel normal noise in normalised space, i.e. uint8
      ``clip(round(255 · (mean_c + std_c · z)))``. z comes from a pinned generator: PCG64 seeded with
      SeedSequence([ERASE_TAG, seed]) (numpy guarantees bit generator streams stable), 12 bits per value, mapped
      through a fixed 4096-entry normal quantile table per channel. No numpy distribution code is involved,
      so the noise replays bit for bit on any numpy/CPU.
  ``mean`` (torchvision's default ``value=0`` after normalisation): the mean colour ``round(255 · mean_c)``.

Version 2 of the recipes stores the box as codes on a grid and no seed (three int16):
``erase_shape`` = 0 (not erased) or 1 + area code · 16 + aspect code (area fraction: the midpoints of
[min_area, max_area] cut into 16; aspect: the midpoints of log [min_aspect, 1/min_aspect] cut into 16, see
`geometry.log_grid`), ``erase_y``/``erase_x`` = 0..31 spread over the free range [0, S - h] / [0, S - w]. The
draw is the one above with the continuous area and aspect quantised to the grid. The pixel noise comes from the
view's identity instead of a stored seed: SeedSequence([ERASE_TAG, cache seed, epoch, sample index]) through
the same pinned generator and table (`noise` with a tuple key), so the erased pixels are still a pure function
of what the cache records.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from logitcache.views.ops.geometry import grid_position, lin_grid, log_grid

ERASE_TAG = 0x65726173  # "eras"
NOISE_BITS = 12
ERASE_AREA_CODES, ERASE_RATIO_CODES, ERASE_POS_CODES = 8, 8, 16


def draw_erasing(rng: np.random.Generator, size: int, *, p: float, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3) -> list[int]:
    """``[top, left, height, width, seed]`` of one view's erased box; zeros when nothing is erased."""
    if not rng.random() < p:
        return [0, 0, 0, 0, 0]
    area = size * size
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if 0 < w < size and 0 < h < size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return [top, left, h, w, int(rng.integers(0, 2**15))]
    return [0, 0, 0, 0, 0]


@lru_cache(maxsize=16)
def _noise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 4096) uint8: channel c's value for each 12-bit noise code (normal quantiles at (k + 0.5) / 4096)."""
    nd = NormalDist()
    z = np.array([nd.inv_cdf((k + 0.5) / 2**NOISE_BITS) for k in range(2**NOISE_BITS)])
    rows = [np.clip(np.floor(255.0 * (m + s * z) + 0.5), 0, 255) for m, s in zip(mean, std, strict=True)]
    return np.stack(rows).astype(np.uint8)


def noise(seed: int | tuple[int, ...], h: int, w: int, mean, std) -> np.ndarray:
    """(h, w, C) uint8 noise for an erased box, a pure function of (seed, h, w, mean, std); ``seed``: the stored
    seed (version 1) or the view's (cache seed, epoch, index) (version 2)."""
    c = len(mean)
    n = h * w * c
    key = [int(v) for v in seed] if isinstance(seed, tuple) else [int(seed)]
    words = np.random.PCG64(np.random.SeedSequence([ERASE_TAG, *key])).random_raw((n + 4) // 5)
    words = np.asarray(words, dtype=np.uint64)
    codes = np.stack([(words >> np.uint64(NOISE_BITS * i)) & np.uint64(2**NOISE_BITS - 1) for i in range(5)], 1)
    codes = codes.reshape(-1)[:n].astype(np.intp).reshape(h, w, c)
    table = _noise_table(tuple(float(x) for x in mean), tuple(float(x) for x in std))
    return np.stack([table[k][codes[..., k]] for k in range(c)], axis=-1)


def apply_erasing(hwc: np.ndarray, params, *, mode: str, mean, std, key: tuple[int, ...] | None = None) -> np.ndarray:
    """Erase the stored box of an (S, S, C) uint8 array in place and return it. ``params``: version 1's
    ``[top, left, height, width, seed]``, or version 2's box ``[top, left, height, width]`` (`box_from_codes`) with
    ``key`` = the view's (cache seed, epoch, index) for the noise."""
    top, left, h, w = (int(v) for v in params[:4])
    seed = key if key is not None else (int(params[4]) if len(params) > 4 else None)
    if h == 0 or w == 0:
        return hwc
    S0, S1 = hwc.shape[:2]
    if not (0 <= top and 0 <= left and top + h <= S0 and left + w <= S1):
        raise ValueError(f"erasing box {params} does not fit a {S0}x{S1} view")
    if mode == "pixel":
        if seed is None:
            raise ValueError("pixel erasing of a version-2 view needs the view's (seed, epoch, index)")
        hwc[top:top + h, left:left + w] = noise(seed, h, w, mean, std)
    elif mode == "mean":
        hwc[top:top + h, left:left + w] = np.array([min(255, round(255 * m)) for m in mean], dtype=np.uint8)
    else:
        raise ValueError(f"unknown erasing mode {mode!r}")
    return hwc


# ------------------------------------------------------------------ version 2: the box on a grid, no stored seed
def _coded_box_size(shape: int, size: int, min_area: float, max_area: float, min_aspect: float) -> tuple[int, int]:
    a, r = divmod(shape - 1, ERASE_RATIO_CODES)
    target_area = lin_grid(min_area, max_area, ERASE_AREA_CODES, a) * size * size
    aspect = log_grid(min_aspect, 1 / min_aspect, ERASE_RATIO_CODES)[r]
    return int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))


def draw_erasing_codes(rng: np.random.Generator, size: int, *, p: float, min_area: float = 0.02,
                       max_area: float = 1 / 3, min_aspect: float = 0.3) -> list[int]:
    """``[erase_shape, erase_y, erase_x]`` of one view (zeros: not erased); see the module doc."""
    if not rng.random() < p:
        return [0, 0, 0]
    for _ in range(10):
        shape = 1 + int(rng.integers(ERASE_AREA_CODES)) * ERASE_RATIO_CODES + int(rng.integers(ERASE_RATIO_CODES))
        h, w = _coded_box_size(shape, size, min_area, max_area, min_aspect)
        if 0 < w < size and 0 < h < size:
            return [shape, int(rng.integers(ERASE_POS_CODES)), int(rng.integers(ERASE_POS_CODES))]
    return [0, 0, 0]


def box_from_codes(codes, size: int, *, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> list[int]:
    """The version-1 box ``[top, left, height, width]`` of stored codes on an S x S view (zeros: not erased)."""
    shape, y, x = (int(v) for v in codes)
    if shape == 0 and y == x == 0:
        return [0, 0, 0, 0]
    if not (1 <= shape <= ERASE_AREA_CODES * ERASE_RATIO_CODES and 0 <= y < ERASE_POS_CODES
            and 0 <= x < ERASE_POS_CODES):
        raise ValueError(f"erasing codes {list(codes)} are not valid")
    h, w = _coded_box_size(shape, size, min_area, max_area, min_aspect)
    if not (0 < w < size and 0 < h < size):
        raise ValueError(f"erasing codes {list(codes)} give a {h}x{w} box, which does not fit a {size}x{size} view")
    return [grid_position(y, size - h, ERASE_POS_CODES), grid_position(x, size - w, ERASE_POS_CODES), h, w]
