"""Models by name, the small-image nets, the USKD weak head, and safe weight loading.

Names (see `available_models()`):
  * every torchvision classification model (`resnet18`, `mobilenet_v2`, `regnet_y_400mf`, `vit_b_16`, `swin_t`, ...),
    built with `torchvision.models.get_model`;
  * ``timm:<name>`` when timm is importable (a clear `ModelError` otherwise);
  * the models defined here:

    =================  =======  ======  ==========================================================================
    name               params   input   what
    =================  =======  ======  ==========================================================================
    ``smallcnn``       24 k     28 px   Fashion-MNIST demo student: 3 stages of one 3x3 conv (16/32/64 ch)
    ``smallcnn_wide``  289 k    28 px   Fashion-MNIST demo teacher: 3 stages of two 3x3 convs (32/64/128 ch)
    ``resnet8x4``      1.2 M    32 px   CIFAR ResNet of the KD literature (CRD / mdistiller), 1 block per stage
    ``resnet32x4``     7.4 M    32 px   same, 5 blocks per stage (the usual teacher of resnet8x4)
    ``mobilenetv1``    4.2 M    224 px  MobileNet (1.0 width) of the ResNet-50 -> MobileNet ImageNet pair
    ``deit_tiny``      5.7 M    224 px  torchvision `VisionTransformer`: patch 16, 12 layers, 3 heads, 192, MLP 768
    =================  =======  ======  ==========================================================================

  Training throughput at 28 px, batch 128, SGD step (forward + backward + update), 2 CPU threads of the
  development machine, shared with other jobs, so +-30 %: smallcnn ~6,600 img/s (~9,000 with channels_last),
  smallcnn_wide ~1,100 img/s (~1,600 channels_last), resnet8x4 ~280 img/s (~370). Inference: smallcnn ~14,000
  img/s (~43,000 channels_last), smallcnn_wide ~3,800 img/s (~5,600). The weak head costs smallcnn nothing
  measurable. So the demo trains smallcnn students on all 60,000 Fashion-MNIST images in ~10 s
  per epoch; resnet8x4 is listed for CIFAR-style work, not for the CPU demo.

All models take 3-channel input (the data layer always decodes RGB) and return logits `(N, num_classes)`.

Normalisation (`model_normalization`): ImageNet mean/std for torchvision, timm (their pretrained config when
timm knows it) and the ImageNet-style models here (`mobilenetv1`, `deit_tiny`); Fashion-MNIST statistics
replicated over three channels, mean 0.2860 / std 0.3530, for the small-image models (`smallcnn*`, `resnet*x4`),
which this project trains on Fashion-MNIST. The statistics are a property of the model's training data, so a
cache and a student record them; change them here (one table) for other small-image data.

USKD weak head (`attach_weak_head` -> `WeakHeadModel`, forward returns ``(logits, weak_logits)``):
``weak_logits = Linear(pool(F))`` where F is a mid-level feature captured with a forward hook, pooled as the
authors do (global average for CNN maps, the class token for ViTs, taken before the final norm):

    ResNet/ResNeXt/Wide-ResNet  ``layer3`` (stride 16; 256 ch on resnet18/34, 1024 on resnet50)
    RegNet                      ``trunk_output.block3``
    Swin (v1, v2)               ``features.5`` (stage 2, NHWC: averaged over H and W)
    ConvNeXt                    ``features.5`` (stage 2)
    MobileNetV2/V3, EfficientNet``features[-2]``: the last inverted-residual stage before the final 1x1 conv
                                (320 ch on mobilenet_v2)
    ShuffleNetV2                ``stage3`` (stride 16)
    ViT (torchvision), deit_tiny class token after block ``len//2 - 1`` (block 5, the 6th of 12)
    mobilenetv1                 ``model.11``: the last 512-ch stride-16 block, before the two 1024-ch blocks
    resnet8x4 / resnet32x4      ``layer2``: the penultimate of the three stages (128 ch, stride 2). The ImageNet
                                rule reads the penultimate of four stages; reading ``layer3`` here would give
                                the head the very feature the classifier reads.
    smallcnn / smallcnn_wide    ``features.1``: the penultimate of the three stages (32 / 64 ch, stride 4)
    timm (untested here)        ViT-style (``blocks`` + ``cls_token``): class token after the middle block;
                                CNNs: the last ``feature_info`` entry of reduction 16
Other torchvision models (VGG, DenseNet, ...) have no default site: pass ``site=`` and ``layout=``.

Weights (`load_weights`, `build_model(weights=...)`): a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``
or ``ResNet34_Weights.IMAGENET1K_V1``) or a checkpoint file (local path or fsspec URL). Everything is read by
`load_checkpoint`, the one function here that calls `torch.load`, always with ``weights_only=True``; that
includes the torchvision files, which we download ourselves into torch hub's cache (torchvision's own loader
unpickles). A file that needs pickle raises `UnsafeCheckpointError`. A failed download raises `WeightsError`;
weights are never silently left random.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torchvision
from torch import nn

from logitcache.errors import ModelError, WeightsError
from logitcache.models.small import CifarResNet, MobileNetV1, SmallCNN, _check_patch_divisible, _deit_tiny
from logitcache.models.weak_head import _LAYOUTS, WeakHeadModel, WeakLayout, _probe_site_shape, resolve_module_path
from logitcache.models.weights import (
    _is_file_source,
    _torchvision_names,
    _torchvision_weights,
    is_hub_source,
    load_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Fashion-MNIST training-set pixel statistics (0.2860 / 0.3530 on [0, 1]), replicated over R, G and B.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)


TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the tool needs to know about a model name.

    ``weak_site`` is a dotted module path inside the model; an integer segment indexes a container's children
    (negative from the end) and ``mid`` is child ``len // 2 - 1``. ``"auto"`` (timm) is resolved on the built
    model. ``None`` means no default site is known.
    """

    name: str
    source: Literal["logitcache", "torchvision", "timm"]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weak_site: str | None
    weak_layout: WeakLayout | None
    builder: Callable[[int, int | None], nn.Module] = field(repr=False, compare=False)


# ---------------------------------------------------------------------------------------------------------------
# Small-image models


def _local(name, input_size, mean, std, site, layout, builder) -> ModelSpec:
    return ModelSpec(name, "logitcache", input_size, mean, std, site, layout, builder)


_FM, _FS, _IM, _IS = FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
LOCAL_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _local("smallcnn", 28, _FM, _FS, "features.1", "nchw", lambda nc, _: SmallCNN(nc, (16, 32, 64), 1)),
        _local("smallcnn_wide", 28, _FM, _FS, "features.1", "nchw", lambda nc, _: SmallCNN(nc, (32, 64, 128), 2)),
        _local("resnet8x4", 32, _FM, _FS, "layer2", "nchw", lambda nc, _: CifarResNet(8, (32, 64, 128, 256), nc)),
        _local("resnet32x4", 32, _FM, _FS, "layer2", "nchw", lambda nc, _: CifarResNet(32, (32, 64, 128, 256), nc)),
        _local("mobilenetv1", 224, _IM, _IS, "model.11", "nchw", lambda nc, _: MobileNetV1(nc)),
        _local("deit_tiny", 224, _IM, _IS, "encoder.layers.mid", "cls_token", _deit_tiny),
    ]
}

# ---------------------------------------------------------------------------------------------------------------
# torchvision and timm specs

#: (name prefix, weak site, layout) for torchvision families; the first matching prefix wins.
_TORCHVISION_WEAK_SITES: list[tuple[str, str, WeakLayout]] = [
    ("resnet", "layer3", "nchw"),
    ("resnext", "layer3", "nchw"),
    ("wide_resnet", "layer3", "nchw"),
    ("regnet_", "trunk_output.block3", "nchw"),
    ("swin_", "features.5", "nhwc"),
    ("convnext_", "features.5", "nchw"),
    ("mobilenet_", "features.-2", "nchw"),
    ("efficientnet_", "features.-2", "nchw"),
    ("shufflenet_v2", "stage3", "nchw"),
    ("vit_", "encoder.layers.mid", "cls_token"),
]


def _torchvision_spec(name: str) -> ModelSpec:
    site, layout = None, None
    for prefix, s, lay in _TORCHVISION_WEAK_SITES:
        if name.startswith(prefix):
            site, layout = s, lay
            break
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    try:  # the DEFAULT weights' eval transform knows the model's intended input size and statistics
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        size = int(transform.crop_size[0])
        mean, std = tuple(transform.mean), tuple(transform.std)
    except (ValueError, AttributeError, KeyError):
        pass

    def build(num_classes: int, image_size: int | None) -> nn.Module:
        kwargs: dict[str, Any] = {}
        if name.startswith("vit_") and image_size is not None:
            _check_patch_divisible(name, image_size, int(re.search(r"_(\d+)$", name).group(1)))
            kwargs["image_size"] = image_size
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return ModelSpec(name, "torchvision", size, mean, std, site, layout, build)


def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise ModelError("timm models (names 'timm:...') need timm, which is not installed: pip install timm") from e
    return timm


def _timm_spec(name: str) -> ModelSpec:
    timm = _import_timm()
    arch = name[len(TIMM_PREFIX) :]
    if arch not in timm.list_models() and arch not in timm.list_models(pretrained=True):
        raise ModelError(f"unknown timm model {arch!r}")
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    cfg = timm.get_pretrained_cfg(arch) if hasattr(timm, "get_pretrained_cfg") else None
    if cfg is not None:
        size = int(getattr(cfg, "input_size", (3, 224, 224))[-1])
        mean, std = tuple(getattr(cfg, "mean", mean)), tuple(getattr(cfg, "std", std))

    def build(num_classes: int, image_size: int | None) -> nn.Module:
        if image_size is not None:
            try:  # only ViT-style timm models take img_size; CNNs are size-agnostic
                return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=image_size)
            except TypeError:
                pass
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)

    return ModelSpec(name, "timm", size, mean, std, "auto", None, build)


def available_models() -> list[str]:
    """Names `build_model` accepts (timm names, ``timm:<name>``, are not listed)."""
    return sorted(LOCAL_MODELS) + _torchvision_names()


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a model name; `ModelError` naming close matches when it is unknown."""
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    if name in _torchvision_names():
        return _torchvision_spec(name)
    import difflib

    close = difflib.get_close_matches(name, available_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see logitcache.models.available_models()"
    raise ModelError(f"unknown model {name!r}{hint}")


def model_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` per RGB channel, on pixels scaled to [0, 1], that model `name` expects."""
    spec = model_spec(name)
    return spec.mean, spec.std


def build_model(name: str, num_classes: int, *, weights: str | None = None, image_size: int | None = None) -> nn.Module:
    """Build model `name` with a `num_classes`-way classifier, randomly initialised or loaded from `weights`.

    ``image_size`` matters only for ViT-style models (position embeddings); CNNs ignore it. For torchvision ViTs
    with torchvision weights and no ``image_size``, the weights' own size is used.
    ``weights``: see `load_weights`. Torchvision weights require ``num_classes`` to equal their class count.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = model_spec(name)
    if weights is not None and not _is_file_source(weights) and not is_hub_source(weights, name):
        if spec.source != "torchvision":
            hint = (" (timm models take a weights file, hf-hub:<owner>/<repo>, or 'pretrained')"
                    if spec.source == "timm" else "")
            raise WeightsError(
                f"{weights!r} is not an existing file, and torchvision weight names apply only to torchvision "
                f"models; {name} is not one{hint}"
            )
        tv_weights = _torchvision_weights(weights, name)
        n_categories = len(tv_weights.meta["categories"])
        if num_classes != n_categories:
            raise WeightsError(
                f"{tv_weights}: these weights classify {n_categories} classes, but num_classes={num_classes}"
            )
        if image_size is None and name.startswith("vit_"):
            image_size = int(tv_weights.meta["min_size"][0])
    model = spec.builder(num_classes, image_size)
    if weights is not None:
        load_weights(model, weights, arch=name)
    return model


# ---------------------------------------------------------------------------------------------------------------
# USKD weak head


# ---------------------------------------------------------------------------------------------------------------
# Weights




def _timm_weak_site(model: nn.Module) -> tuple[str, WeakLayout]:
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "cls_token") and len(blocks) > 1:
        return "blocks.mid", ("cls_token" if model.cls_token is not None else "token_mean")
    info = getattr(model, "feature_info", None)
    if info:
        entries = [e for e in info if e.get("reduction") == 16]
        if entries:
            layout: WeakLayout = "nhwc" if str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC" else "nchw"
            return entries[-1]["module"], layout
    raise ModelError(f"no weak-head site known for timm model {type(model).__name__}; pass site= and layout=")


def attach_weak_head(
    model: nn.Module,
    name: str,
    num_classes: int,
    *,
    site: str | None = None,
    layout: WeakLayout | None = None,
    image_size: int | None = None,
) -> WeakHeadModel:
    """Wrap `model` (built as `name`) with USKD's weak head at its default site, or at `site` / `layout`.

    The head's input width is measured by a forward of one zero image (size: the model's own for ViTs, else
    ``image_size`` or the spec's input size) that stops at the site, in eval mode, without gradients.
    """
    spec = model_spec(name)
    if site is None:
        if spec.weak_site == "auto":
            site, auto_layout = _timm_weak_site(model)
            layout = layout or auto_layout
        elif spec.weak_site is None:
            raise ModelError(f"no USKD weak-head site is known for {name}; pass site= (a module path) and layout=")
        else:
            site = spec.weak_site
    layout = layout or spec.weak_layout
    if layout is None:
        raise ModelError(f"{name}: pass layout= (one of {_LAYOUTS}) with a custom weak-head site")
    site, module = resolve_module_path(model, site)
    size = getattr(model, "image_size", None)  # torchvision ViT
    patch_embed = getattr(model, "patch_embed", None)  # timm ViT
    if size is None and patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        size = patch_embed.img_size[0]
    size = size or image_size or spec.input_size
    shape = _probe_site_shape(model, module, int(size))
    channels = shape[-1] if layout in ("nhwc", "cls_token", "token_mean") else shape[1]
    return WeakHeadModel(model, site=site, layout=layout, num_classes=num_classes, channels=channels)


