"""The unit stage of mixing recipes: a view's partner is another view of the same (epoch, shard) unit.

    for sample in the shard, in offset order:  mixer.push(sample)  -> finished MixedViews (or [])
    at the shard's end:                          mixer.finish()      -> the rest

Recipes that do not mix pass each view straight through (no buffering). Mixing recipes buffer one block of
``recipe.mix_block`` consecutive offsets (base views, i.e. everything but the mix), then mix each with its
partner: drawn with `block_partners` (dump, fresh views) or read from the stored ``mix_partner`` (replay);
version-2 recipes derive it from the unit alone (`cycle_partners`, which needs the unit's length).
So dump, `CachedViews`, `FreshViews` and ``verify --recompute`` produce the same pixels and labels through
this one class, whatever the batch size, worker or rank counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from logitcache.errors import RecipeError
from logitcache.views.ops import mix as mixop
from logitcache.views.recipe import Recipe, apply_view, sample_view
from logitcache.views.rng import view_rng


class MixedView(NamedTuple):
    """One finished view: the sample, its uint8 (3, S, S) pixels, its int16 (P,) params, the partner's label
    (= the sample's own when not mixed) and λ, the weight of the sample's own label (1.0 when not mixed)."""

    sample: Any
    image: torch.Tensor
    params: np.ndarray
    partner_label: int
    lam: float


class UnitMixer:
    """Views of one (epoch, shard) unit. ``stored``: the unit's ``view_params`` (replay); None: draw them with
    ``view_rng(seed, epoch, sample.index)`` and the unit's partner cycles (dump, fresh views). ``length``: the
    unit's number of samples (skipped ones included), needed to draw a version-2 mixing recipe's views; with
    ``stored`` it is ``len(stored)``."""

    def __init__(self, recipe: Recipe, *, seed: int, epoch: int, shard: int, stored: np.ndarray | None = None,
                 length: int | None = None):
        self.recipe, self.seed, self.epoch, self.shard, self.stored = recipe, seed, epoch, shard, stored
        self.length = len(stored) if stored is not None else length
        if recipe.coded and recipe.mixes and self.length is None:
            raise ValueError(f"recipe {recipe.name!r} v{recipe.version} mixes inside the unit: give its length")
        self._block: int | None = None
        self._buf: list[tuple[Any, torch.Tensor, np.ndarray]] = []

    def _params(self, sample) -> np.ndarray:
        if self.stored is not None:
            if sample.offset >= len(self.stored):
                raise RecipeError(f"{sample.where}: offset {sample.offset} has no stored view params")
            return np.asarray(self.stored[sample.offset], dtype=np.int16).copy()
        _, h, w = sample.image.shape
        return sample_view(view_rng(self.seed, self.epoch, sample.index), h, w, self.recipe).to_array()

    def push(self, sample, source=None) -> list[MixedView]:
        """The views this sample finishes (``source``: `view_source` of its image, when several units share it)."""
        params = self._params(sample)
        base = apply_view(sample.image, self.recipe.params_from_array(params), self.recipe,
                          key=(self.seed, self.epoch, sample.index), source=source)
        if not self.recipe.mixes:
            return [MixedView(sample, base, params, sample.label, 1.0)]
        out: list[MixedView] = []
        block = sample.offset // self.recipe.mix_block
        if self._block is not None and block != self._block:
            out = self._mix_block()
        self._block = block
        self._buf.append((sample, base, params))
        return out

    def finish(self) -> list[MixedView]:
        return self._mix_block() if self._buf else []

    def __iter__(self) -> Iterator[MixedView]:  # pragma: no cover - convenience
        raise TypeError("push samples and call finish()")

    def _mix_block(self) -> list[MixedView]:
        buf, self._buf = self._buf, []
        by_offset = {s.offset: (s, base, p) for s, base, p in buf}
        partners = self._partners(buf, by_offset)
        out = []
        for s, base, p in buf:
            mode, (lam_field, my, mx) = self._mix_fields(s, p)
            if mode == mixop.MIX_NONE:
                out.append(MixedView(s, base, p, s.label, 1.0))
                continue
            partner = by_offset.get(partners.get(s.offset, s.offset))
            if partners.get(s.offset, s.offset) == s.offset or partner is None:
                raise RecipeError(f"{s.where}: its view mixes with offset {partners.get(s.offset)} of the "
                                  f"same shard, which is not among the decoded samples of its block (was it "
                                  f"skipped here but not when the cache was made?)")
            own = base.permute(1, 2, 0).numpy()
            other = partner[1].permute(1, 2, 0).numpy()
            mixed = mixop.apply_mix(own, other, mode, lam_field, my, mx)
            lam = mixop.mix_lambda(mode, lam_field, my, mx, self.recipe.image_size)
            out.append(MixedView(s, torch.from_numpy(mixed).permute(2, 0, 1), p, partner[0].label, lam))
        return out

    def _partners(self, buf, by_offset) -> dict[int, int]:
        """offset -> partner offset of the block's views; when drawing, the views that have no decoded partner
        are made unmixed (their mode and mix fields zeroed)."""
        r = self.recipe
        i_mode = r.field_index("flags")
        if r.coded:
            partners = mixop.cycle_partners(self.seed, self.epoch, self.shard, self._block, r.mix_block, self.length)
            i_mix = r.field_index("mix_lam")
        else:
            i_mix = r.field_index("mix_partner")
            if self.stored is not None:
                return {s.offset: s.offset + int(p[i_mix]) for s, _, p in buf}
            partners = mixop.block_partners(self.seed, self.epoch, self.shard, self._block, list(by_offset))
        for s, _, p in buf:
            if self.stored is not None:
                continue
            if partners.get(s.offset) in by_offset:
                if not r.coded:
                    p[i_mix] = partners[s.offset] - s.offset
            else:  # no decoded partner (a block with one decoded sample; v2: the partner was skipped)
                p[i_mode] = mixop.encode_flags(bool(p[i_mode] & 1), mixop.MIX_NONE, r.coded)
                p[i_mix:i_mix + (4 if not r.coded else 3)] = 0
        return partners

    def _mix_fields(self, s, p) -> tuple[int, tuple[int, int, int]]:
        """(mode, (mix_lam, mix_y, mix_x)) in version 1's units (λ·256 or box side, centre in pixels)."""
        r = self.recipe
        i = r.field_index("mix_lam")
        try:
            mode = mixop.decode_mode(p[r.field_index("flags")], r.coded)
            if not r.coded:
                return mode, tuple(int(v) for v in p[i:i + 3])
            return mode, mixop.fields_from_codes(mode, p[i:i + 3], r.image_size, r.cutmix_box)
        except ValueError as e:
            raise RecipeError(f"{s.where}: {e}") from e


def mixed_targets(target: torch.Tensor, partner_target: torch.Tensor, lam: torch.Tensor, num_classes: int,
                  smoothing: float = 0.0) -> torch.Tensor:
    """(N, C) float32 score labels ``λ·y + (1-λ)·y_partner``, label-smoothed as timm's ``mixup_target``."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = torch.full((len(target), num_classes), off, device=target.device).scatter_(1, target.long()[:, None], on)
    y2 = torch.full((len(target), num_classes), off, device=target.device).scatter_(
        1, partner_target.long()[:, None], on)
    lam = lam.to(device=target.device, dtype=torch.float32)[:, None]
    return y1 * lam + y2 * (1.0 - lam)
