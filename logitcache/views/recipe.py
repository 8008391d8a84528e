"""Replayable augmented views: draw the parameters of a view, then apply them, in two pure functions.

    params = sample_view(view_rng(seed, epoch, index), height, width, recipe)   # dump: drawn, then cached
    x      = apply_view(image, params, recipe)                                  # dump and train: same pixels

The sampling is a pure function of ``(seed, epoch, global_index)`` and the source image size, so it does not
depend on worker count, rank count or reading order. ``apply_view`` is the one function that turns params into
pixels; "the same view" means the same uint8 pixels after crop/resize/flip and before normalisation (each model
normalises its own way, see `normalize`). Mixing recipes (``deit``, ``tv-v2``) mix each such view with a
partner view of the same (epoch, shard) unit afterwards: `logitcache.views.mixing.UnitMixer`.

Which code resizes, and why the bytes are the same on any machine: ``imagenet`` v3 (the newest) resizes the
uint8 crop with torch (`resize_tensor`, torchvision v2's resize of uint8 tensors), so its views equal
torchvision's v2 ``RandomResizedCrop(antialias=True)`` + ``RandomHorizontalFlip`` on uint8 tensors, given the
same box and flip; torch's uint8 antialiased kernels are fixed-point integer code whose generic path
(``ATEN_CPU_CAPABILITY=default``, what ARM CPUs take) gives the AVX2/AVX512 bytes (checked by a test on every
run; the replay's view digests would also catch a torch that changed them). It costs a third of Pillow's
resize, the largest per-view cost of replaying (README, issue 17). The other recipes and versions resize with
Pillow's antialiased bilinear/bicubic, fixed-point integer C code with no CPU-specific variants, after cropping
the tensor (as torchvision's ``resized_crop`` does): their views equal torchvision's transforms on PIL images,
which RandAugment / TrivialAugment need anyway (they are Pillow operations).

Recipes are named and versioned; a recipe's settings are serialised into every cache (``Recipe.to_json``) and a
cache made by a different version of a recipe is refused rather than replayed approximately.

    imagenet v3  RandomResizedCrop 0.08-1 bilinear (torch, uint8), flip       eval: resize 256, center 224
    small v1     pad 4 + crop, flip                                            eval: resize
    deit v2      RRC 0.08-1 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25 (pixel noise),
                 Mixup 0.8 / CutMix 1.0 switch 0.5                            eval: bicubic resize 256, center 224
    tv-v2 v2     RRC 0.08-1 bilinear, flip, TrivialAugmentWide, RandomErasing 0.1 (mean colour),
                 Mixup 0.2 / CutMix 1.0 switch 0.5                            eval: resize 232, center 224

imagenet / deit / tv-v2 v1 (still replayed) store source-pixel boxes (deit / tv-v2 also an erasing seed and the
partner offset); v2 (what `get_recipe` makes for deit / tv-v2; ``name@1`` the older one) stores grid codes instead
(`Recipe.coded`): the crop box is a pure function of the codes and the image size (`crop_box`), the erasing
noise is keyed by the view's (seed, epoch, index) and the partner comes from the unit (see the ops' modules and
README "Augmentation recipes"). imagenet v1 views equal torchvision's RandomResizedCrop exactly given its box;
v2 draws the same distribution on the crop grid; v3 (what `get_recipe` makes for imagenet) is v2's codes and
views resized by torch instead of Pillow (pixels within ±1 of v2's).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from logitcache.errors import CacheMismatchError, RecipeError
from logitcache.views.ops import erasing as erasing_op
from logitcache.views.ops import mix as mix_op
from logitcache.views.ops import randaugment as ra_op
from logitcache.views.ops import trivialaugment as ta_op
from logitcache.views.ops.geometry import (
    _check_image,
    _from_pil,
    _random_resized_crop_box,
    _to_pil,
    _window,
    crop_box_from_codes,
    draw_crop_codes,
    resize,
    resize_tensor,
)
from logitcache.views.params import ArrayParams, ViewParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BILINEAR = "bilinear-antialias-pillow"
_BICUBIC = "bicubic-antialias-pillow"
_BILINEAR_TORCH = "bilinear-antialias-torch"  # torch.nn.functional.interpolate on the uint8 tensor
_RESAMPLE = {_BILINEAR: Image.Resampling.BILINEAR, _BICUBIC: Image.Resampling.BICUBIC}
_TORCH_MODE = {_BILINEAR_TORCH: "bilinear"}
_TV_INTERP = {_BILINEAR: InterpolationMode.BILINEAR, _BICUBIC: InterpolationMode.BICUBIC}
_CROP = ("scale", "ratio", "flip_p", "interpolation", "eval_crop_fraction")
_AUG = ("erasing_p", "erasing_mode", "mixup_alpha", "cutmix_alpha", "mix_switch", "mix_prob", "mix_block",
        "cutmix_box", "fill_mean", "fill_std")
_RA_PATTERN = re.compile(r"rand-m(\d+)-mstd([0-9.]+)-inc1")

_BOX_FIELDS = ("top", "left", "height", "width")
_ERASE_FIELDS = ("erase_top", "erase_left", "erase_height", "erase_width", "erase_seed")
_MIX_FIELDS = ("mix_partner", "mix_lam", "mix_y", "mix_x")
# version 2 of the augmenting recipes: codes on documented grids, no stored seed or partner (see README)
_CROP_CODES = ("crop_area", "crop_ratio", "crop_y", "crop_x")
_ERASE_CODES = ("erase_shape", "erase_y", "erase_x")
_MIX_CODES = ("mix_lam", "mix_y", "mix_x")
_RA_FIELDS = ("ra_op0", "ra_mag0", "ra_op1", "ra_mag1")
_TA_FIELDS = ("ta_op", "ta_bin")


@dataclass(frozen=True)
class _Spec:
    version: int
    image_size: int
    settings: tuple[str, ...]
    defaults: dict[str, Any]
    fields: tuple[str, ...]
    filters: tuple[str, ...] = (_BILINEAR,)  # the ``interpolation`` settings this version implements


# DeiT (Touvron et al. 2021; facebookresearch/deit main.py defaults), i.e. timm's create_transform(
# auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel") + Mixup(0.8,
# cutmix 1.0, switch 0.5). flags = flip | mix mode << 1.
_DEIT = dict(interpolation=_BICUBIC, randaugment="rand-m9-mstd0.5-inc1", erasing_p=0.25, erasing_mode="pixel",
             mixup_alpha=0.8, cutmix_alpha=1.0, mix_switch=0.5, mix_prob=1.0, cutmix_box="timm")
# torchvision's current classification recipe: ResNet-50 IMAGENET1K_V2 ("How to Train State-Of-The-Art Models
# Using TorchVision's Latest Primitives", 2021; references/classification/train.py --auto-augment ta_wide
# --random-erase 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 --val-resize-size 232; its train crop is 176:
# --image-size 176). Label smoothing 0.1 is a training setting (--label-smoothing), not part of the views.
_TV2 = dict(interpolation=_BILINEAR, trivialaugment=31, erasing_p=0.1, erasing_mode="mean", mixup_alpha=0.2,
            cutmix_alpha=1.0, mix_switch=0.5, mix_prob=1.0, cutmix_box="torchvision", eval_crop_fraction=224 / 232)

_PILLOW_FILTERS = (_BILINEAR, _BICUBIC)
#: every (name, version) this logitcache can replay; `get_recipe` makes the newest of each name
_RECIPES: dict[tuple[str, int], _Spec] = {
    ("imagenet", 1): _Spec(1, 224, _CROP, {}, (*_BOX_FIELDS, "flip")),
    ("imagenet", 2): _Spec(2, 224, _CROP, {}, (*_CROP_CODES, "flip")),
    ("imagenet", 3): _Spec(3, 224, _CROP, {"interpolation": _BILINEAR_TORCH}, (*_CROP_CODES, "flip"),
                           (_BILINEAR_TORCH,)),
    ("small", 1): _Spec(1, 28, ("pad", "flip_p", "interpolation"), {}, (*_BOX_FIELDS, "flip")),
    ("deit", 1): _Spec(1, 224, (*_CROP, "randaugment", *_AUG), _DEIT,
                       (*_BOX_FIELDS, "flags", *_RA_FIELDS, *_ERASE_FIELDS, *_MIX_FIELDS), _PILLOW_FILTERS),
    ("deit", 2): _Spec(2, 224, (*_CROP, "randaugment", *_AUG), _DEIT,
                       (*_CROP_CODES, "flags", *_RA_FIELDS, *_ERASE_CODES, *_MIX_CODES), _PILLOW_FILTERS),
    ("tv-v2", 1): _Spec(1, 224, (*_CROP, "trivialaugment", *_AUG), _TV2,
                        (*_BOX_FIELDS, "flags", *_TA_FIELDS, *_ERASE_FIELDS, *_MIX_FIELDS), _PILLOW_FILTERS),
    ("tv-v2", 2): _Spec(2, 224, (*_CROP, "trivialaugment", *_AUG), _TV2,
                        (*_CROP_CODES, "flags", *_TA_FIELDS, *_ERASE_CODES, *_MIX_CODES), _PILLOW_FILTERS),
}
_NAMES = sorted({n for n, _ in _RECIPES})
_NEWEST = {n: max(v for m, v in _RECIPES if m == n) for n in _NAMES}


def split_recipe_name(name: str) -> tuple[str, int | None]:
    """``"imagenet@1"`` -> ``("imagenet", 1)``; ``"imagenet"`` -> ``("imagenet", None)`` (the newest version)."""
    base, at, version = name.partition("@")
    if not at:
        return name, None
    if not version.isdigit():
        raise RecipeError(f"recipe {name!r}: the version after '@' must be a number (e.g. {base}@1)")
    return base, int(version)


def _spec(name: str, version: int | None = None) -> _Spec:
    if name not in _NEWEST:
        raise RecipeError(f"unknown recipe {name!r}; known: {_NAMES}")
    v = _NEWEST[name] if version is None else version
    if (name, v) not in _RECIPES:
        raise RecipeError(
            f"recipe {name!r} version {v} cannot be replayed by this logitcache, which implements versions "
            f"{sorted(m for n, m in _RECIPES if n == name)} (the pixels would differ)")
    return _RECIPES[(name, v)]


@dataclass(frozen=True)
class Recipe:
    """A named, versioned view recipe and its settings.

    ``imagenet``: RandomResizedCrop (``scale``, ``ratio``; torchvision's 10-attempt algorithm and its
    center-crop fallback; versions 2 and 3 on the crop-code grid; version 3 resized by torch on the uint8
    tensor, ``interpolation`` = bilinear-antialias-torch) to ``image_size`` + horizontal flip with probability
    ``flip_p``; eval = resize the shorter side to ``floor(image_size / eval_crop_fraction)`` + center crop.
    ``small`` (Fashion-MNIST/CIFAR style): zero-pad ``pad`` px, random crop of the source size, flip; resized to
    ``image_size`` only when the source differs; eval = resize only.
    ``deit`` / ``tv-v2``: the ``imagenet`` crop and flip with the recipe's filter, then RandAugment
    (``randaugment``, timm's config string) or TrivialAugmentWide (``trivialaugment`` bins), RandomErasing
    (``erasing_*``) and Mixup/CutMix (``mixup_alpha``, ``cutmix_alpha``, ``mix_switch``, ``mix_prob``; partner
    within blocks of ``mix_block`` offsets of the unit; ``cutmix_box`` = timm's or torchvision's box rule).
    ``fill_mean``/``fill_std``: the mean colour that geometric ops and mean erasing fill with, and the
    normalisation in which pixel erasing draws its noise (ImageNet's, whatever the model's).
    Bump a recipe's version whenever the pixels its params produce change.
    """

    name: str
    version: int
    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    flip_p: float = 0.5
    interpolation: str = _BILINEAR
    eval_crop_fraction: float = 0.875
    randaugment: str = ""
    trivialaugment: int = 0
    erasing_p: float = 0.0
    erasing_mode: str = "pixel"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch: float = 0.5
    mix_prob: float = 1.0
    mix_block: int = 16
    cutmix_box: str = "timm"
    fill_mean: tuple[float, float, float] = IMAGENET_MEAN
    fill_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        _spec(self.name, self.version)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise RecipeError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.interpolation not in _spec(self.name, self.version).filters:
            raise RecipeError(f"interpolation {self.interpolation!r} is not implemented for {self.name!r} version "
                              f"{self.version} (it implements {list(_spec(self.name, self.version).filters)})")
        if not 0.0 <= self.flip_p <= 1.0:
            raise RecipeError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise RecipeError(f"bad scale {self.scale} or ratio {self.ratio}")
        if self.pad < 0 or not 0 < self.eval_crop_fraction <= 1:
            raise RecipeError(f"bad pad {self.pad} or eval_crop_fraction {self.eval_crop_fraction}")
        if self.randaugment:
            self.randaugment_settings  # noqa: B018 - parses (and so checks) the config string
        if not (0 <= self.erasing_p <= 1 and 0 <= self.mix_prob <= 1 and 0 <= self.mix_switch <= 1):
            raise RecipeError("erasing_p, mix_prob and mix_switch must be in [0, 1]")
        if self.erasing_mode not in ("pixel", "mean") or self.cutmix_box not in ("timm", "torchvision"):
            raise RecipeError(f"erasing_mode {self.erasing_mode!r} / cutmix_box {self.cutmix_box!r} unknown")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not 2 <= self.mix_block <= 64:
            raise RecipeError("mixup/cutmix alphas must be >= 0 and mix_block in [2, 64]")
        if self.trivialaugment not in (0, ta_op.NUM_BINS):
            raise RecipeError(f"trivialaugment implements {ta_op.NUM_BINS} magnitude bins, got {self.trivialaugment}")

    # ---------------------------------------------------------------- derived facts
    @property
    def param_fields(self) -> tuple[str, ...]:
        """The names of a view's int16 params, in stored order."""
        return _spec(self.name, self.version).fields

    def field_index(self, name: str) -> int:
        return self.param_fields.index(name)

    @property
    def augments(self) -> bool:
        """A recipe beyond crop + flip (its params are an `ArrayParams`)."""
        return self.name not in ("imagenet", "small")

    @property
    def coded(self) -> bool:
        """Version 2 of a RandomResizedCrop recipe (imagenet, deit, tv-v2): the crop stored as grid codes (the box
        is a function of the codes and the image size); for the augmenting ones also erasing and mix as codes,
        the erasing noise keyed by the view's identity and the mix partner derived from the unit."""
        return self.name != "small" and self.version >= 2

    @property
    def mixes(self) -> bool:
        """Views are mixed with a partner of their unit (`logitcache.views.mixing.UnitMixer`)."""
        return self.augments and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @property
    def randaugment_settings(self) -> tuple[float, float]:
        """(magnitude, magnitude std) of ``randaugment`` (only timm's ``rand-m{M}-mstd{S}-inc1`` form)."""
        m = _RA_PATTERN.fullmatch(self.randaugment)
        if m is None:
            raise RecipeError(f"randaugment {self.randaugment!r}: only timm's 'rand-m<M>-mstd<S>-inc1' form "
                              f"(2 ops, p 0.5, the increasing op set) is implemented")
        return float(m.group(1)), float(m.group(2))

    @property
    def resample(self) -> int:
        """Pillow's filter (the recipes that resize with Pillow)."""
        if self.interpolation not in _RESAMPLE:
            raise RecipeError(f"recipe {self.name!r} v{self.version} resizes with torch ({self.interpolation})")
        return _RESAMPLE[self.interpolation]

    @property
    def torch_mode(self) -> str | None:
        """torch's interpolate mode when this recipe resizes the uint8 tensor with torch (`resize_tensor`), else
        None (Pillow resizes)."""
        return _TORCH_MODE.get(self.interpolation)

    @property
    def fill(self) -> tuple[int, ...]:
        """timm's ``img_mean`` fill colour: round(255 · mean)."""
        return tuple(min(255, round(255 * m)) for m in self.fill_mean)

    def params_from_array(self, arr) -> ViewParams | ArrayParams:
        """The stored int16 row of one view as this recipe's params object."""
        if self.augments or self.coded:
            return ArrayParams.from_array(self, arr)
        return ViewParams.from_array(self, arr)

    def to_json(self) -> dict[str, Any]:
        """The recipe's name, version, image size and the settings it uses (what a cache records)."""
        d: dict[str, Any] = {"name": self.name, "version": self.version, "image_size": self.image_size}
        for key in _spec(self.name, self.version).settings:
            v = getattr(self, key)
            d[key] = list(v) if isinstance(v, tuple) else v
        d["param_fields"] = list(self.param_fields)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        name = d.get("name")
        if not isinstance(name, str):
            raise RecipeError(f"unknown recipe {name!r}; known: {_NAMES}")
        version = d.get("version")
        if not isinstance(version, int):
            raise RecipeError(f"recipe {name!r}: malformed version {version!r}")
        spec = _spec(name, version)
        fields = d.pop("param_fields", None)
        if fields is not None and tuple(fields) != spec.fields:
            raise RecipeError(f"recipe {name!r} version {version} records param fields {fields}, this logitcache "
                              f"has {spec.fields}")
        allowed = {"name", "version", "image_size", *spec.settings}
        unknown = set(d) - allowed
        if unknown:
            raise RecipeError(f"recipe {name!r} has settings this version does not know: {sorted(unknown)}")
        try:
            for key in ("scale", "ratio", "fill_mean", "fill_std"):
                if key in d:
                    d[key] = tuple(float(x) for x in d[key])
            return cls(**{**spec.defaults, **d})
        except (TypeError, ValueError) as e:
            if isinstance(e, RecipeError):
                raise
            raise RecipeError(f"recipe {name!r}: malformed settings {d} ({e})") from e


def get_recipe(name: str, image_size: int | None = None, version: int | None = None) -> Recipe:
    """Recipe ``name`` (its newest version unless ``version``, or ``name@version`` as ``--recipe`` takes it) at
    ``image_size`` px (default: small 28, the others 224)."""
    name, at = split_recipe_name(name)
    if at is not None and version is not None and at != version:
        raise RecipeError(f"recipe {name!r}: version {at} (from '@') and version {version} disagree")
    spec = _spec(name, version if version is not None else at)
    return Recipe(name=name, version=spec.version, image_size=int(image_size or spec.image_size), **spec.defaults)


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
    2. else ``--recipe`` (at ``--image-size`` or the recipe's default size; ``name@version`` picks an older
       version, e.g. ``imagenet@1``, else the newest);
    3. else the data's ``default_recipe`` (recorded by converters that know it, e.g. Fashion-MNIST: small, 28);
    4. else a clear error — never a silent guess (imagenet at 224 px on 28 px images).
    """
    if cached is not None:
        recipe = Recipe.from_json(cached)
        diff = []
        base, version = split_recipe_name(name) if name is not None else (None, None)
        if base is not None and (base != recipe.name or version not in (None, recipe.version)):
            diff.append(f"--recipe {name}, but {cached_where} holds views of recipe {recipe.name!r} version "
                        f"{recipe.version}")
        if image_size is not None and image_size != recipe.image_size:
            diff.append(f"--image-size {image_size}, but {cached_where} holds views of {recipe.image_size} px")
        if diff:
            raise CacheMismatchError("; ".join(diff) + " (drop the flag, or use a cache made with it)")
        return recipe
    if name is not None:
        return get_recipe(name, image_size)
    if default is not None:
        return get_recipe(default["name"], image_size or default.get("image_size"))
    raise RecipeError(f"no view recipe: give --recipe ({'|'.join(_NAMES)}) [--image-size PX]; "
                      f"there is no cache, and {default_where} records no default_recipe")


def sample_view(rng: np.random.Generator, height: int, width: int, recipe: Recipe) -> ViewParams | ArrayParams:
    """Draw one view's params for a ``height`` x ``width`` source image (crop first, then the flip, then the
    recipe's other ops in the order they are applied; the mix partner is the unit's, see `UnitMixer`)."""
    if height < 1 or width < 1:
        raise RecipeError(f"cannot sample a view of a {height}x{width} image")
    if recipe.name == "small":  # a source-sized window over the zero-padded image, offset uniform in [-pad, pad]
        p = recipe.pad
        crop = [int(rng.integers(0, 2 * p + 1)) - p, int(rng.integers(0, 2 * p + 1)) - p, height, width]
    elif recipe.coded:
        crop = draw_crop_codes(rng, height, width, recipe.scale, recipe.ratio)
    else:
        crop = list(_random_resized_crop_box(rng, height, width, recipe.scale, recipe.ratio))
    flip = bool(rng.random() < recipe.flip_p)
    if not recipe.augments:
        return ArrayParams.from_array(recipe, [*crop, int(flip)]) if recipe.coded else ViewParams(*crop, flip)
    S = recipe.image_size
    if recipe.randaugment:
        m, mstd = recipe.randaugment_settings
        ops = ra_op.draw_randaugment(rng, magnitude=m, magnitude_std=mstd, coded=recipe.coded)
    else:
        ops = ta_op.draw_trivialaugment(rng)
    mix_kw = dict(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, switch_prob=recipe.mix_switch,
                  prob=recipe.mix_prob)
    if recipe.coded:
        erase = erasing_op.draw_erasing_codes(rng, S, p=recipe.erasing_p)
        mode, mixed = mix_op.draw_mix_codes(rng, **mix_kw)
        return ArrayParams.from_array(recipe, [*crop, mix_op.encode_flags(flip, mode, True), *ops, *erase, *mixed])
    erase = erasing_op.draw_erasing(rng, S, p=recipe.erasing_p)
    mode, mixed = mix_op.draw_mix(rng, S, **mix_kw, box_rule=recipe.cutmix_box)
    return ArrayParams.from_array(recipe, [*crop, int(flip) | mode << 1, *ops, *erase, 0, *mixed])


# ------------------------------------------------------------------ applying (the pixels the model sees)
def crop_box(params: ViewParams | ArrayParams, recipe: Recipe, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in source pixels of view ``params`` on a ``height`` x ``width`` image: the stored
    box (version 1, small) or the box of the stored crop codes (version 2, `crop_box_from_codes`)."""
    if not recipe.coded:
        return params.top, params.left, params.height, params.width
    if not isinstance(params, ArrayParams):
        raise RecipeError(f"view {params}: recipe {recipe.name!r} v{recipe.version} stores crop codes "
                          f"{_CROP_CODES}, not a box")
    try:
        return crop_box_from_codes(params.get(*_CROP_CODES), height, width, recipe.scale, recipe.ratio)
    except ValueError as e:
        raise RecipeError(f"view {params}: {e}") from e


#: views of one decoded image from which converting the whole image to PIL once beats converting each crop
#: (measured, 500x375: the whole image 0.08 ms, a crop of it 0.05 ms from the tensor or 0.01 ms from PIL)
SHARED_SOURCE_MIN_VIEWS = 3


def view_source(image: torch.Tensor, recipe: Recipe, views: int) -> Image.Image | None:
    """``image`` as one PIL image for `apply_view(..., source=)` when ``views`` views of it are about to be made
    and that saves time (crop recipes, at least `SHARED_SOURCE_MIN_VIEWS` views); else None. The views are the
    same bytes either way."""
    if views < SHARED_SOURCE_MIN_VIEWS or recipe.name == "small" or recipe.torch_mode:
        return None  # torch-resized recipes never go through PIL
    _check_image(image)
    return _to_pil(image)


def apply_view(image: torch.Tensor, params: ViewParams | ArrayParams, recipe: Recipe,
               key: tuple[int, int, int] | None = None, *, source: Image.Image | None = None) -> torch.Tensor:
    """The view ``params`` of ``image`` (uint8 (3, H, W)) as a new uint8 (3, S, S) tensor, S = image_size.

    imagenet: crop the box, resize to S x S (bilinear, antialiased: v3 by torch on the uint8 tensor, older
    versions by Pillow), flip. small: take the source-sized window
    at (top, left) of the zero-padded image, resize to S x S only if the source is not S x S, flip.
    deit / tv-v2: the imagenet steps with the recipe's filter, then RandAugment / TrivialAugment and erasing;
    NOT the mix, which needs the partner view (`logitcache.views.mixing.UnitMixer` does it). Version 2 (coded)
    recipes take the crop box from the stored codes and the image size, and ``key`` = the view's
    ``(cache seed, epoch, sample index)`` for the erasing noise.
    Params that do not fit the image (a replay against the wrong image) raise `RecipeError`.
    Resized views come out as contiguous planes (a batch stacks them with a plain copy). ``source``: the same
    image already converted by `view_source` (several views of one image: its crops are cut from it).
    """
    _check_image(image)
    _, H, W = image.shape
    t, l, h, w = crop_box(params, recipe, H, W)
    if recipe.name != "small":
        if not (0 <= t and 0 <= l and h >= 1 and w >= 1 and t + h <= H and l + w <= W):
            raise RecipeError(f"view {params} does not fit a {H}x{W} image")
        x = image[:, t : t + h, l : l + w]
    else:
        if (h, w) != (H, W) or max(abs(t), abs(l)) > recipe.pad:
            raise RecipeError(f"view {params} does not fit a {H}x{W} image with pad {recipe.pad}")
        x = _window(image, t, l)
    S = recipe.image_size
    if not recipe.augments and tuple(x.shape[1:]) == (S, S):
        return torch.flip(x, dims=(-1,)) if params.flip else x.clone()
    if recipe.torch_mode:  # imagenet v3: no PIL at all
        x = resize_tensor(x, S, S, recipe.torch_mode)
        return torch.flip(x, dims=(-1,)) if params.flip else x
    im = _to_pil(x) if source is None or recipe.name == "small" else source.crop((l, t, l + w, t + h))
    if im.size != (S, S):
        im = im.resize((S, S), recipe.resample)
    if not recipe.augments:  # flipped as a tensor: the same bytes as PIL's transpose, in a quarter of its time
        x = _from_pil(im)
        return torch.flip(x, dims=(-1,)) if params.flip else x
    if params.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if recipe.coded and recipe.erasing_mode == "pixel" and key is None and params.get("erase_shape")[0]:
        raise RecipeError(f"view {params}: recipe {recipe.name!r} v{recipe.version} erases with noise keyed by the "
                          f"view's (seed, epoch, index); none was given")
    try:
        if recipe.randaugment:
            im = ra_op.apply_randaugment(im, params.get(*_RA_FIELDS), fill=recipe.fill, resample=recipe.resample,
                                         center=recipe.randaugment_settings[0] if recipe.coded else None)
        else:
            im = ta_op.apply_trivialaugment(im, params.get("ta_op", "ta_bin"),
                                            interpolation=_TV_INTERP[recipe.interpolation])
        a = np.array(im)
        if recipe.coded:
            box = erasing_op.box_from_codes(params.get(*_ERASE_CODES), S)
            erasing_op.apply_erasing(a, box, mode=recipe.erasing_mode, mean=recipe.fill_mean, std=recipe.fill_std,
                                     key=key)
        else:
            erasing_op.apply_erasing(a, params.get(*_ERASE_FIELDS), mode=recipe.erasing_mode,
                                     mean=recipe.fill_mean, std=recipe.fill_std)
    except ValueError as e:
        raise RecipeError(f"view {params}: {e}") from e
    return torch.from_numpy(a).permute(2, 0, 1)


def eval_view(image: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The deterministic evaluation view, uint8 (3, S, S).

    imagenet, deit, tv-v2: resize the shorter side to ``floor(S / eval_crop_fraction)`` (256 for 224; the longer
    side as torchvision's ``Resize(int)`` computes it) with the recipe's filter and center-crop S x S.
    small: resize to S x S if needed.
    """
    _check_image(image)
    S = recipe.image_size
    if recipe.name == "small":
        return resize(image, S, S) if tuple(image.shape[1:]) != (S, S) else image.clone()
    _, H, W = image.shape
    short_target = int(math.floor(S / recipe.eval_crop_fraction))
    if H <= W:
        new_h, new_w = short_target, int(short_target * W / H)
    else:
        new_h, new_w = int(short_target * H / W), short_target
    top, left = int(round((new_h - S) / 2.0)), int(round((new_w - S) / 2.0))
    if recipe.torch_mode:
        return resize_tensor(image, new_h, new_w, recipe.torch_mode)[:, top : top + S, left : left + S].contiguous()
    im = _to_pil(image).resize((new_w, new_h), recipe.resample)
    return _from_pil(im.crop((left, top, left + S, top + S)))
