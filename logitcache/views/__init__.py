"""Views: how one augmented view of an image is drawn and made. Draw the parameters (a pure function of
``view_rng(seed, epoch, index)`` and the image size), store them, then apply them (deterministic uint8 pixels,
the same function in the dump and in training).

    rng.py      view_rng: the per-view numpy Generator (no global RNG anywhere)
    params.py   ViewParams: what a cache stores per view to replay it
    recipe.py   named, versioned recipes: sample_view (draw), apply_view (make), eval_view
    ops/        the operations recipes are built from (geometry: crops, pad window, resize, flip)
"""

from logitcache.views.ops.geometry import normalize, resize
from logitcache.views.params import ViewParams
from logitcache.views.recipe import Recipe, apply_view, eval_view, get_recipe, sample_view
from logitcache.views.rng import view_rng

__all__ = ["Recipe", "ViewParams", "apply_view", "eval_view", "get_recipe", "normalize", "resize", "sample_view",
           "view_rng"]
