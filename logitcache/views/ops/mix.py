"""Mixup and CutMix with the partner chosen inside the (epoch, shard) unit, as explicit params.

Partner: the unit's offsets are cut into blocks of ``block`` consecutive offsets; the samples of a block that
decoded are put in a random cyclic order drawn from ``unit_rng(seed, epoch, shard, block index)`` and each is
mixed with the next one in that cycle. So the partner depends on nothing but the unit (not on batch size,
workers or ranks), and only one block of views needs to be held to mix. A block with one sample left mixes
nothing. Stored as ``mix_partner`` = partner offset - own offset (|·| < block; 0 = not mixed).

Per view (timm ``Mixup`` in 'elem' mode: each view its own λ and choice, ``prob`` 1 in the recipes):
``mode`` (0 none, 1 mixup, 2 cutmix) = cutmix with probability ``switch_prob`` when both are on;
λ ~ Beta(α, α) of the chosen one.
  mixup:  ``mix_lam`` = q = round(256 λ) (λ = q / 256 is the truth); pixels (q·a + (256-q)·b + 128) >> 8,
          integer arithmetic (uint8 in, uint8 out; timm's uint8 collate also rounds the mix to uint8).
  cutmix: box side ``cut`` and centre (``mix_y``, ``mix_x``) with timm's ``rand_bbox``: cut = int(S sqrt(1-λ)),
          centre uniform in [0, S); the box [cy - cut//2, cy + (cut+1)//2) x [...] clipped to the view holds the
          partner's pixels; λ = 1 - box area / S² (timm's correct_lam; torchvision's v2 CutMix too).
          ``mix_lam`` holds ``cut``. torchvision's box (half = int(S/2 sqrt(1-λ)), [c - half, c + half)) is
          ``cut = 2 * half`` in the same formula.
Targets: λ · y_self + (1 - λ) · y_partner (then label smoothing, as timm's ``mixup_target``).
"""

from __future__ import annotations

import math

import numpy as np

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
LAM_ONE = 256
UNIT_RNG_TAG = 0x6D697875  # "mixu"


def unit_rng(seed: int, epoch: int, shard: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([UNIT_RNG_TAG, seed, epoch, shard, block])))


def block_partners(seed: int, epoch: int, shard: int, block: int, offsets: list[int]) -> dict[int, int]:
    """offset -> partner offset for the decoded ``offsets`` of one block (a random cycle; {} for < 2)."""
    offsets = sorted(offsets)
    if len(offsets) < 2:
        return {}
    order = [offsets[i] for i in unit_rng(seed, epoch, shard, block).permutation(len(offsets))]
    return {o: order[(i + 1) % len(order)] for i, o in enumerate(order)}


def draw_mix(rng: np.random.Generator, size: int, *, mixup_alpha: float, cutmix_alpha: float,
             switch_prob: float, prob: float = 1.0, box_rule: str = "timm") -> tuple[int, list[int]]:
    """``(mode, [mix_lam, mix_y, mix_x])`` for one view (the partner is the unit's, see `block_partners`)."""
    use_cutmix = bool(rng.random() < switch_prob) if mixup_alpha > 0 and cutmix_alpha > 0 else cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    applied = rng.random() < prob
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    if not applied:
        return MIX_NONE, [0, 0, 0]
    if not use_cutmix:
        return MIX_MIXUP, [int(round(lam * LAM_ONE)), 0, 0]
    r = math.sqrt(1.0 - lam)
    cut = int(size * r) if box_rule == "timm" else 2 * int(0.5 * r * size)
    return MIX_CUTMIX, [cut, cy, cx]


def cutmix_box(size: int, cut: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pasted box, clipped to the view."""
    y0, y1 = max(cy - cut // 2, 0), min(cy + (cut + 1) // 2, size)
    x0, x1 = max(cx - cut // 2, 0), min(cx + (cut + 1) // 2, size)
    return y0, max(y1, y0), x0, max(x1, x0)


def mix_lambda(mode: int, lam_field: int, cy: int, cx: int, size: int) -> float:
    """The weight of the view's own label (1.0 when not mixed)."""
    if mode == MIX_MIXUP:
        return lam_field / LAM_ONE
    if mode == MIX_CUTMIX:
        y0, y1, x0, x1 = cutmix_box(size, lam_field, cy, cx)
        return 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)
    return 1.0


def apply_mix(own: np.ndarray, partner: np.ndarray, mode: int, lam_field: int, cy: int, cx: int) -> np.ndarray:
    """The mixed (S, S, C) uint8 view of ``own`` with ``partner`` (both (S, S, C) uint8); new array."""
    if mode == MIX_NONE:
        return own.copy()
    if own.shape != partner.shape:
        raise ValueError(f"cannot mix views shaped {own.shape} and {partner.shape}")
    if mode == MIX_MIXUP:
        if not 0 <= lam_field <= LAM_ONE:
            raise ValueError(f"mixup weight {lam_field} is outside [0, {LAM_ONE}]")
        acc = own.astype(np.uint32) * lam_field + partner.astype(np.uint32) * (LAM_ONE - lam_field) + LAM_ONE // 2
        return (acc >> 8).astype(np.uint8)
    if mode == MIX_CUTMIX:
        size = own.shape[0]
        y0, y1, x0, x1 = cutmix_box(size, lam_field, cy, cx)
        out = own.copy()
        out[y0:y1, x0:x1] = partner[y0:y1, x0:x1]
        return out
    raise ValueError(f"unknown mix mode {mode}")
