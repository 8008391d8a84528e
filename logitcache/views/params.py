"""`ViewParams`: what a cache stores per view to replay it exactly (a crop box in source pixels and a flip)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.errors import RecipeError


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
        info = np.iinfo(np.int16)
        if any(v < info.min or v > info.max for v in values):
            raise RecipeError(f"view params {self} do not fit int16 (source images up to 32767 px are supported)")
        return np.asarray(values, dtype=np.int16)

    @classmethod
    def from_array(cls, recipe, arr) -> ViewParams:
        a = np.asarray(arr).reshape(-1)
        if a.shape[0] != len(recipe.param_fields):
            raise RecipeError(f"expected view params {recipe.param_fields}, got {a.shape[0]} values")
        top, left, height, width, flip = (int(v) for v in a)
        return cls(top, left, height, width, bool(flip))


