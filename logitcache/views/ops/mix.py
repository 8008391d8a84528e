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

Version 2 of the recipes stores no partner and coarser codes (three int16 + the mode in ``flags``):
  partner: the cycle of `block_partners` over ALL offsets of the block, [16 b, min(16 b + 16, unit length)) —
          a pure function of (seed, epoch, shard, block, unit length), so the stored mode alone says "mixed with
          the next view of the cycle". A view whose partner was skipped as corrupt by the dump is not mixed.
  ``mix_lam`` = c = min(floor(32 λ), 31): λ is the midpoint (2c + 1)/64 of the 1/32 bin holding the draw
          (Mixup weights the pixels by 4(2c + 1) / 256; CutMix's box side is cut = int(S sqrt(1 - λ)), or
          torchvision's 2·int(S/2 sqrt(1 - λ))).
  ``mix_y``/``mix_x`` = CutMix centre codes 0..31, centre = ((2 c + 1) S) // 64 (the middle of one of 32 bands).
  ``flags`` = flip | cutmix << 1 | unmixed << 2 (each bit near-independent, which the bit-shuffling compressor
          of the cache rewards; version 1: flip | mode << 1).
"""

from __future__ import annotations

import math

import numpy as np

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
LAM_ONE = 256
UNIT_RNG_TAG = 0x6D697875  # "mixu"
LAM_CODES, MIX_POS_CODES = 32, 16


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


# ------------------------------------------------------------------ version 2: partner from the unit, coarse codes
def cycle_partners(seed: int, epoch: int, shard: int, block: int, block_size: int, length: int) -> dict[int, int]:
    """offset -> partner offset for every offset of the block (its whole range inside the unit's ``length``)."""
    lo = block * block_size
    return block_partners(seed, epoch, shard, block, list(range(lo, min(lo + block_size, length))))


def draw_mix_codes(rng: np.random.Generator, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                   prob: float = 1.0) -> tuple[int, list[int]]:
    """``(mode, [mix_lam, mix_y, mix_x])`` of one view on version 2's grid (the draws of `draw_mix`, quantised)."""
    use_cutmix = bool(rng.random() < switch_prob) if mixup_alpha > 0 and cutmix_alpha > 0 else cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam_code = min(int(float(rng.beta(alpha, alpha)) * LAM_CODES), LAM_CODES - 1)
    applied = rng.random() < prob
    cy, cx = int(rng.integers(MIX_POS_CODES)), int(rng.integers(MIX_POS_CODES))
    if not applied:
        return MIX_NONE, [0, 0, 0]
    if not use_cutmix:
        return MIX_MIXUP, [lam_code, 0, 0]
    return MIX_CUTMIX, [lam_code, cy, cx]


def fields_from_codes(mode: int, codes, size: int, box_rule: str) -> tuple[int, int, int]:
    """Version 2's ``[mix_lam, mix_y, mix_x]`` as version 1's ``(mix_lam, mix_y, mix_x)`` (λ·256 or box side,
    centre in pixels) for `apply_mix` and `mix_lambda`."""
    lam_code, y, x = (int(v) for v in codes)
    if mode == MIX_NONE:
        return 0, 0, 0
    if not (0 <= lam_code < LAM_CODES and 0 <= y < MIX_POS_CODES and 0 <= x < MIX_POS_CODES):
        raise ValueError(f"mix codes {list(codes)} are not valid")
    if mode == MIX_MIXUP:
        return (2 * lam_code + 1) * (LAM_ONE // (2 * LAM_CODES)), 0, 0
    r = math.sqrt(1.0 - (2 * lam_code + 1) / (2 * LAM_CODES))
    cut = int(size * r) if box_rule == "timm" else 2 * int(0.5 * r * size)
    band = 2 * MIX_POS_CODES
    return cut, (2 * y + 1) * size // band, (2 * x + 1) * size // band


def encode_flags(flip: bool, mode: int, coded: bool) -> int:
    """The ``flags`` field: version 1 flip | mode << 1; version 2 flip | cutmix << 1 | unmixed << 2."""
    if not coded:
        return int(flip) | mode << 1
    return int(flip) | int(mode == MIX_CUTMIX) << 1 | int(mode == MIX_NONE) << 2


def decode_mode(flags: int, coded: bool) -> int:
    """The mix mode (MIX_NONE, MIX_MIXUP, MIX_CUTMIX) of a ``flags`` field."""
    if not coded:
        return (int(flags) >> 1) & 3
    if int(flags) & ~7 or (int(flags) & 6) == 6:
        raise ValueError(f"flags {int(flags)} are not valid")
    return MIX_NONE if int(flags) & 4 else (MIX_CUTMIX if int(flags) & 2 else MIX_MIXUP)
