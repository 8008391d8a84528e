"""What a cache stores per view to replay it exactly: `ViewParams` (imagenet v1, small: a crop box in source pixels
and a flip) and `ArrayParams` (imagenet v2, deit, tv-v2: one int16 per `Recipe.param_fields`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.errors import RecipeError

_INT16_MIN, _INT16_MAX = -(1 << 15), (1 << 15) - 1  # what a stored view param must fit (np.iinfo per view is slow)


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to recreate one view: a crop box in SOURCE-pixel coordinates and a horizontal flip.

    ``imagenet``: the RandomResizedCrop box (inside the image). ``small``: the pad-crop window, which has the
    source's size and may start at ``-pad`` (the part outside the image is zero padding).
    Stored in a cache as one int16 row in ``Recipe.param_fields`` order.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def to_array(self) -> np.ndarray:
        """``[top, left, height, width, flip]`` as int16 (the cache's dtype); out-of-range values raise."""
        values = [self.top, self.left, self.height, self.width, int(self.flip)]
        if min(values) < _INT16_MIN or max(values) > _INT16_MAX:
            raise RecipeError(f"view params {self} do not fit int16 (source images up to 32767 px are supported)")
        return np.asarray(values, dtype=np.int16)

    @classmethod
    def from_array(cls, recipe, arr) -> ViewParams:
        a = np.asarray(arr).reshape(-1)
        if a.shape[0] != len(recipe.param_fields):
            raise RecipeError(f"expected view params {recipe.param_fields}, got {a.shape[0]} values")
        top, left, height, width, flip = (int(v) for v in a.tolist())
        return cls(top, left, height, width, bool(flip))




@dataclass(frozen=True)
class ArrayParams:
    """The params of a view of ``imagenet`` v2 (four crop codes + ``flip``) or of an augmenting recipe (``deit``,
    ``tv-v2``): one int16 per ``recipe.param_fields``.

    Version 1: the crop box (``top``, ``left``, ``height``, ``width``, source pixels) and ``flags`` (bit 0: flip,
    bits 1-2: mix mode) come first; version 2: four crop codes, then ``flags`` (bit 0 flip, bit 1 CutMix, bit 2
    not mixed). The other fields belong to the ops (see each op's module for what it stores).
    """

    fields: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self):
        if len(self.fields) != len(self.values):
            raise RecipeError(f"expected view params {self.fields}, got {len(self.values)} values")
        if self.values and (min(self.values) < _INT16_MIN or max(self.values) > _INT16_MAX):
            raise RecipeError(f"view params {self} do not fit int16 (source images up to 32767 px are supported)")

    def get(self, *names: str) -> list[int]:
        return [self.values[self.fields.index(n)] for n in names]

    def _box(self, name: str) -> int:
        if name not in self.fields:
            raise RecipeError(f"view params {self} hold crop codes, not a box: the box depends on the image size "
                              f"(logitcache.views.ops.geometry.crop_box_from_codes)")
        return self.values[self.fields.index(name)]

    @property
    def top(self) -> int:
        return self._box("top")

    @property
    def left(self) -> int:
        return self._box("left")

    @property
    def height(self) -> int:
        return self._box("height")

    @property
    def width(self) -> int:
        return self._box("width")

    @property
    def flip(self) -> bool:
        if "flip" in self.fields:  # imagenet v2: crop codes + flip
            return bool(self.values[self.fields.index("flip")])
        return bool(self.values[self.fields.index("flags")] & 1)

    def to_array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.int16)

    @classmethod
    def from_array(cls, recipe, arr) -> ArrayParams:
        a = np.asarray(arr).reshape(-1)
        return cls(recipe.param_fields, tuple(a.tolist()))  # tolist: Python ints, in C

    def __str__(self) -> str:
        return "(" + ", ".join(f"{f}={v}" for f, v in zip(self.fields, self.values, strict=True)) + ")"
