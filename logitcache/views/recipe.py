"""Replayable augmented views: draw the parameters of a view, then apply them, in two pure functions.

    params = sample_view(view_rng(seed, epoch, index), height, width, recipe)   # dump: drawn, then cached
    x      = apply_view(image, params, recipe)                                  # dump and train: same pixels

The sampling is a pure function of ``(seed, epoch, global_index)`` and the source image size, so it does not
depend on worker count, rank count or reading order. ``apply_view`` is the one function that turns params into
pixels; "the same view" means the same uint8 pixels after crop/resize/flip and before normalisation (each model
normalises its own way, see `normalize`).

Why Pillow does the resizing: Pillow's bilinear (antialiased) resampling is fixed-point integer C code with no
CPU-specific variants, so the same params give the same bytes on any machine. torch's uint8 antialiased resize
was measured to give different bytes with ``ATEN_CPU_CAPABILITY=default`` (the path ARM CPUs such as Grace take)
than with AVX2/AVX512, so a cache dumped on one machine would not replay exactly on another. Cropping happens on
the tensor first (as torchvision's ``resized_crop`` does), so our ``imagenet`` views equal torchvision's
``RandomResizedCrop`` + ``RandomHorizontalFlip`` on PIL images, given the same box and flip.

Recipes are named and versioned; a recipe's settings are serialised into every cache (``Recipe.to_json``) and a
cache made by a different version of a recipe is refused rather than replayed approximately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from logitcache.errors import CacheMismatchError, RecipeError
from logitcache.views.ops.geometry import _check_image, _from_pil, _random_resized_crop_box, _to_pil, _window, resize
from logitcache.views.params import ViewParams

# name -> (current version, default image size, the settings that recipe uses)
_RECIPES: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "imagenet": (1, 224, ("scale", "ratio", "flip_p", "interpolation", "eval_crop_fraction")),
    "small": (1, 28, ("pad", "flip_p", "interpolation")),
}
_INTERPOLATION = "bilinear-antialias-pillow"  # the only resampling apply_view implements


@dataclass(frozen=True)
class Recipe:
    """A named, versioned view recipe and its settings.

    ``imagenet``: RandomResizedCrop (``scale``, ``ratio``; torchvision's 10-attempt algorithm and its
    center-crop fallback) to ``image_size`` + horizontal flip with probability ``flip_p``; eval = resize the
    shorter side to ``floor(image_size / eval_crop_fraction)`` + center crop.
    ``small`` (Fashion-MNIST/CIFAR style): zero-pad ``pad`` px, random crop of the source size, flip; resized to
    ``image_size`` only when the source differs; eval = resize only.
    Bump a recipe's version whenever the pixels its params produce change.
    """

    name: str
    version: int
    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    flip_p: float = 0.5
    interpolation: str = _INTERPOLATION
    eval_crop_fraction: float = 0.875

    param_fields: ClassVar[tuple[str, ...]] = ("top", "left", "height", "width", "flip")

    def __post_init__(self):
        if self.name not in _RECIPES:
            raise RecipeError(f"unknown recipe {self.name!r}; known: {sorted(_RECIPES)}")
        current = _RECIPES[self.name][0]
        if self.version != current:
            raise RecipeError(
                f"recipe {self.name!r} version {self.version} cannot be replayed by this logitcache, which "
                f"implements version {current} (the pixels would differ)"
            )
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise RecipeError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.interpolation != _INTERPOLATION:
            raise RecipeError(f"interpolation {self.interpolation!r} is not implemented (only {_INTERPOLATION!r})")
        if not 0.0 <= self.flip_p <= 1.0:
            raise RecipeError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise RecipeError(f"bad scale {self.scale} or ratio {self.ratio}")
        if self.pad < 0 or not 0 < self.eval_crop_fraction <= 1:
            raise RecipeError(f"bad pad {self.pad} or eval_crop_fraction {self.eval_crop_fraction}")

    def to_json(self) -> dict[str, Any]:
        """The recipe's name, version, image size and the settings it uses (what a cache records)."""
        d: dict[str, Any] = {"name": self.name, "version": self.version, "image_size": self.image_size}
        for key in _RECIPES[self.name][2]:
            v = getattr(self, key)
            d[key] = list(v) if isinstance(v, tuple) else v
        d["param_fields"] = list(self.param_fields)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        name = d.get("name")
        if name not in _RECIPES:
            raise RecipeError(f"unknown recipe {name!r}; known: {sorted(_RECIPES)}")
        fields = d.pop("param_fields", None)
        if fields is not None and tuple(fields) != cls.param_fields:
            raise RecipeError(f"recipe {name!r} records param fields {fields}, this version has {cls.param_fields}")
        allowed = {"name", "version", "image_size", *_RECIPES[name][2]}
        unknown = set(d) - allowed
        if unknown:
            raise RecipeError(f"recipe {name!r} has settings this version does not know: {sorted(unknown)}")
        try:
            for key in ("scale", "ratio"):
                if key in d:
                    d[key] = tuple(float(x) for x in d[key])
            return cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, RecipeError):
                raise
            raise RecipeError(f"recipe {name!r}: malformed settings {d} ({e})") from e


def get_recipe(name: str, image_size: int | None = None) -> Recipe:
    """The current version of recipe ``name`` at ``image_size`` px (default: imagenet 224, small 28)."""
    if name not in _RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known: {sorted(_RECIPES)}")
    version, default_size, _ = _RECIPES[name]
    return Recipe(name=name, version=version, image_size=int(image_size or default_size))


def resolve_recipe(
    name: str | None,
    image_size: int | None,
    *,
    cached: dict[str, Any] | None = None,
    cached_where: str = "the cache",
    default: dict[str, Any] | None = None,
    default_where: str = "the data's manifest",
) -> Recipe:
    """THE rule every command uses for its view recipe and size:

    1. a cache (``cached``: its recorded recipe) decides; ``--recipe``/``--image-size`` given with it must agree
       with it (accepted when they do, refused naming both values when they do not);
    2. else ``--recipe`` (at ``--image-size`` or the recipe's default size);
    3. else the data's ``default_recipe`` (recorded by converters that know it, e.g. Fashion-MNIST: small, 28);
    4. else a clear error — never a silent guess (imagenet at 224 px on 28 px images).
    """
    if cached is not None:
        recipe = Recipe.from_json(cached)
        diff = []
        if name is not None and name != recipe.name:
            diff.append(f"--recipe {name}, but {cached_where} holds views of recipe {recipe.name!r}")
        if image_size is not None and image_size != recipe.image_size:
            diff.append(f"--image-size {image_size}, but {cached_where} holds views of {recipe.image_size} px")
        if diff:
            raise CacheMismatchError("; ".join(diff) + " (drop the flag, or use a cache made with it)")
        return recipe
    if name is not None:
        return get_recipe(name, image_size)
    if default is not None:
        return get_recipe(default["name"], image_size or default.get("image_size"))
    raise RecipeError(f"no view recipe: give --recipe ({'|'.join(sorted(_RECIPES))}) [--image-size PX]; "
                      f"there is no cache, and {default_where} records no default_recipe")


def sample_view(rng: np.random.Generator, height: int, width: int, recipe: Recipe) -> ViewParams:
    """Draw one view's params for a ``height`` x ``width`` source image (crop first, then the flip)."""
    if height < 1 or width < 1:
        raise RecipeError(f"cannot sample a view of a {height}x{width} image")
    if recipe.name == "imagenet":
        top, left, h, w = _random_resized_crop_box(rng, height, width, recipe.scale, recipe.ratio)
    else:  # small: a source-sized window over the zero-padded image, offset uniform in [-pad, pad]
        p = recipe.pad
        top, left, h, w = int(rng.integers(0, 2 * p + 1)) - p, int(rng.integers(0, 2 * p + 1)) - p, height, width
    flip = bool(rng.random() < recipe.flip_p)
    return ViewParams(top, left, h, w, flip)


# ------------------------------------------------------------------ applying (the pixels the model sees)
def apply_view(image: torch.Tensor, params: ViewParams, recipe: Recipe) -> torch.Tensor:
    """The view ``params`` of ``image`` (uint8 (3, H, W)) as a new uint8 (3, S, S) tensor, S = image_size.

    imagenet: crop the box, resize to S x S (bilinear, antialiased), flip. small: take the source-sized window
    at (top, left) of the zero-padded image, resize to S x S only if the source is not S x S, flip.
    Params that do not fit the image (a replay against the wrong image) raise `RecipeError`.
    Like torchvision's ``PILToTensor``, the result's memory is usually channels-last (HWC): one copy fewer.
    """
    _check_image(image)
    _, H, W = image.shape
    t, l, h, w = params.top, params.left, params.height, params.width
    if recipe.name == "imagenet":
        if not (0 <= t and 0 <= l and h >= 1 and w >= 1 and t + h <= H and l + w <= W):
            raise RecipeError(f"view {params} does not fit a {H}x{W} image")
        x = image[:, t : t + h, l : l + w]
    else:
        if (h, w) != (H, W) or max(abs(t), abs(l)) > recipe.pad:
            raise RecipeError(f"view {params} does not fit a {H}x{W} image with pad {recipe.pad}")
        x = _window(image, t, l)
    S = recipe.image_size
    if tuple(x.shape[1:]) == (S, S):
        return torch.flip(x, dims=(-1,)) if params.flip else x.clone()
    im = _to_pil(x).resize((S, S), Image.Resampling.BILINEAR)
    if params.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _from_pil(im)


def eval_view(image: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The deterministic evaluation view, uint8 (3, S, S).

    imagenet: resize the shorter side to ``floor(S / eval_crop_fraction)`` (256 for 224; the longer side as
    torchvision's ``Resize(int)`` computes it) and center-crop S x S. small: resize to S x S if needed.
    """
    _check_image(image)
    S = recipe.image_size
    if recipe.name != "imagenet":
        return resize(image, S, S) if tuple(image.shape[1:]) != (S, S) else image.clone()
    _, H, W = image.shape
    short_target = int(math.floor(S / recipe.eval_crop_fraction))
    if H <= W:
        new_h, new_w = short_target, int(short_target * W / H)
    else:
        new_h, new_w = int(short_target * H / W), short_target
    im = _to_pil(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - S) / 2.0)), int(round((new_w - S) / 2.0))
    return _from_pil(im.crop((left, top, left + S, top + S)))


