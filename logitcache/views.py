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
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from logitcache.errors import RecipeError

# A domain tag mixed into every view seed, so a (seed, epoch, index) used elsewhere never shares this stream.
VIEW_RNG_TAG = 0x76696577  # "view"

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
    def from_array(cls, recipe: Recipe, arr) -> ViewParams:
        a = np.asarray(arr).reshape(-1)
        if a.shape[0] != len(recipe.param_fields):
            raise RecipeError(f"expected view params {recipe.param_fields}, got {a.shape[0]} values")
        top, left, height, width, flip = (int(v) for v in a)
        return cls(top, left, height, width, bool(flip))


# ------------------------------------------------------------------ sampling (pure, no global RNG)
def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A numpy Generator seeded purely from ``(seed, epoch, global index)`` (SeedSequence hashing, PCG64)."""
    words = []
    for what, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        v = operator.index(v)
        if v < 0:
            raise ValueError(f"view_rng: {what} must be >= 0, got {v}")
        words.append(v)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([VIEW_RNG_TAG, *words])))


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


def _random_resized_crop_box(rng, height, width, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, line for line, with ``rng`` for torch's global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: a central crop with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


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


def _window(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The image shifted so that source pixel (top, left) lands at (0, 0); uncovered pixels are zero."""
    _, H, W = image.shape
    out = torch.zeros((H, W, 3), dtype=torch.uint8).permute(2, 0, 1)  # channels-last, like decoded images
    y0, y1, x0, x1 = max(top, 0), min(top + H, H), max(left, 0), min(left + W, W)
    out[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return out


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


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, h, w) -> new uint8 (3, height, width) with Pillow's antialiased bilinear filter."""
    return _from_pil(_to_pil(image).resize((width, height), Image.Resampling.BILINEAR))


def _to_pil(x: torch.Tensor) -> Image.Image:
    # decoded images are channels-last already, so this is one copy of the (cropped) region at most
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def _from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)  # (3, H, W) over HWC memory, as PILToTensor gives


def _check_image(image) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        what = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise RecipeError(f"views take uint8 (3, H, W) RGB tensors, got {what}")


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as float32, for uint8 (N, C, H, W) or (C, H, W); mean/std per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


__all__ = [
    "Recipe",
    "ViewParams",
    "apply_view",
    "eval_view",
    "get_recipe",
    "normalize",
    "resize",
    "sample_view",
    "view_rng",
]
