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

import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from logitcache.errors import ModelError, UnsafeCheckpointError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Fashion-MNIST training-set pixel statistics (0.2860 / 0.3530 on [0, 1]), replicated over R, G and B.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

#: how a captured mid feature is pooled to a vector: NCHW map, NHWC map (Swin), token sequence (N, S, D).
WeakLayout = Literal["nchw", "nhwc", "cls_token", "token_mean"]
_LAYOUTS = ("nchw", "nhwc", "cls_token", "token_mean")

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


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three stages of ``convs_per_stage`` 3x3 conv-BN-ReLU, 2x2 max-pool after the first two, GAP, linear.

    At 28 px the stages see 28, 14 and 7 px. Kept deliberately plain so that it trains at thousands of
    images per second on two CPU cores.
    """

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64), convs_per_stage: int = 1):
        super().__init__()
        stages = []
        c_in = 3
        for i, width in enumerate(widths):
            layers: list[nn.Module] = []
            for j in range(convs_per_stage):
                layers += _conv_bn_relu(c_in if j == 0 else width, width)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class CifarBasicBlock(nn.Module):
    """The CIFAR ResNet basic block of CRD / mdistiller (same parameter names, so their checkpoints load)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2) as in CRD / mdistiller: depth = 6n + 2, three stages.

    ``resnet8x4`` = depth 8, widths (32, 64, 128, 256); ``resnet32x4`` = depth 32, same widths. The final
    pooling is adaptive (mdistiller uses ``AvgPool2d(8)``: identical at 32 px, and 28 px inputs work too).
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            CifarBasicBlock(c_in, c_out, stride), *(CifarBasicBlock(c_out, c_out) for _ in range(blocks - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetV1(nn.Module):
    """MobileNet (Howard et al. 2017), width 1.0, as used for the ResNet-50 -> MobileNet pair in CRD / DKD.

    Same layout and parameter names as mdistiller's ImageNet ``MobileNetV1`` (``model`` = 14 conv blocks + pool,
    ``fc``), so its checkpoints load. ``model[7:12]`` are the five 512-channel stride-16 blocks; ``model[12:14]``
    the two 1024-channel stride-32 blocks.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))

        def conv_dw(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU(True),
                nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            )

        # (out channels, stride) of the depthwise-separable blocks after the stem
        plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        blocks: list[nn.Module] = [conv_bn(3, 32, 2)]
        c_in = 32
        for c_out, stride in plan:
            blocks.append(conv_dw(c_in, c_out, stride))
            c_in = c_out
        blocks.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


def _deit_tiny(num_classes: int, image_size: int | None) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    size = 224 if image_size is None else image_size
    _check_patch_divisible("deit_tiny", size, 16)
    return VisionTransformer(
        image_size=size, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=num_classes
    )


def _check_patch_divisible(name: str, size: int, patch: int) -> None:
    if size % patch != 0:
        raise ModelError(f"{name}: image size {size} is not a multiple of the patch size {patch}")


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


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


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
    if weights is not None and not _is_file_source(weights):
        if spec.source != "torchvision":
            raise WeightsError(
                f"{weights!r} is not an existing file, and torchvision weight names apply only to torchvision "
                f"models; {name} is not one"
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


def resolve_module_path(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """Follow dotted `path` into `model`; returns the canonical path (real child names) and the module.

    An integer segment (negative allowed) picks a container's child by position; ``mid`` picks child
    ``len // 2 - 1`` (block 5 of 12: the middle block of a ViT, 0-based).
    """
    module, names = model, []
    for segment in path.split("."):
        children = list(module.named_children())
        if segment == "mid" or re.fullmatch(r"-?\d+", segment):
            index = len(children) // 2 - 1 if segment == "mid" else int(segment)
            if not children or not -len(children) <= index < len(children):
                raise ModelError(f"weak-head site {path!r}: {'.'.join(names) or 'model'} has no child {segment}")
            child_name, module = children[index]
        else:
            if segment not in dict(children):
                raise ModelError(f"weak-head site {path!r}: {'.'.join(names) or 'model'} has no child {segment!r}")
            child_name, module = segment, dict(children)[segment]
        names.append(child_name)
    return ".".join(names), module


def pool_mid_feature(feature: Tensor, layout: WeakLayout) -> Tensor:
    """Mid feature -> (N, D): global average over space (NCHW, NHWC), the class token, or the token mean."""
    if layout == "nchw":
        return feature.mean(dim=(2, 3))
    if layout == "nhwc":
        return feature.mean(dim=(1, 2))
    if layout == "cls_token":
        return feature[:, 0]
    if layout == "token_mean":
        return feature.mean(dim=1)
    raise ValueError(f"unknown weak-head layout {layout!r}; expected one of {_LAYOUTS}")


class WeakHeadModel(nn.Module):
    """A model plus USKD's weak head: ``forward(x) -> (logits, weak_logits)``.

    ``weak_logits = weak_head(pool_mid_feature(F, layout))`` where F is the output of ``backbone.<site>``,
    captured by a forward hook during the normal forward, so gradients of the weak loss flow into the backbone
    below the site. The head is an ordinary submodule: its parameters are in ``parameters()`` and DDP
    synchronises them. Works under ``torch.compile`` too (checked on CPU with the aot_eager and inductor
    backends: same outputs, gradients reach the head). State-dict keys are ``backbone.*`` and ``weak_head.*``;
    `load_weights` loads such a checkpoint into a plain model (dropping the head) and a plain checkpoint into
    this (backbone only).
    """

    def __init__(self, backbone: nn.Module, *, site: str, layout: WeakLayout, num_classes: int, channels: int):
        super().__init__()
        if layout not in _LAYOUTS:
            raise ValueError(f"unknown weak-head layout {layout!r}; expected one of {_LAYOUTS}")
        self.backbone = backbone
        self.weak_head = nn.Linear(channels, num_classes)
        self.site, self.layout = resolve_module_path(backbone, site)[0], layout
        self._feature: Tensor | None = None
        self._hook = backbone.get_submodule(self.site).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._feature = output

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._feature = None
        logits = self.backbone(x)
        feature, self._feature = self._feature, None  # drop the reference: the graph keeps what backward needs
        if feature is None:
            raise ModelError(f"weak-head site {self.site!r} did not run during the forward pass")
        return logits, self.weak_head(pool_mid_feature(feature, self.layout))


class _ProbeDone(Exception):
    pass


def _probe_site_shape(model: nn.Module, site_module: nn.Module, image_size: int) -> tuple[int, ...]:
    """Shape of the site's output for one zero image; the forward stops at the site. Modes are restored."""
    shape: list[tuple[int, ...]] = []

    def hook(module, inputs, output):
        shape.append(tuple(output.shape))
        raise _ProbeDone

    modes = [(m, m.training) for m in model.modules()]
    handle = site_module.register_forward_hook(hook)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    except _ProbeDone:
        pass
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    if not shape:
        raise ModelError("the weak-head site did not run during a forward pass")
    return shape[0]


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


# ---------------------------------------------------------------------------------------------------------------
# Weights

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar")
_HASH_IN_FILENAME = re.compile(r"-([a-f0-9]+)\.")


def _is_file_source(src: str | os.PathLike) -> bool:
    """A path or URL (an existing path always wins), as opposed to a torchvision weights name."""
    s = os.fspath(src)
    return "://" in s or "/" in s or os.sep in s or s.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(s)


def load_checkpoint(src: str | os.PathLike) -> Any:
    """Read a torch checkpoint (local path or fsspec URL) with ``weights_only=True``: no code ever runs.

    The one place in logitcache that calls `torch.load`. A file that needs pickle (custom classes, functions)
    raises `UnsafeCheckpointError`; a missing or unreadable file raises `WeightsError`.
    """
    s = os.fspath(src)
    try:
        if "://" in s and not s.startswith("file://"):
            import fsspec

            with fsspec.open(s, "rb") as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        path = s[len("file://") :] if s.startswith("file://") else s
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Everything a pickle can run is reached through a GLOBAL (or STACK_GLOBAL) opcode naming a callable or
        # class; torch names it in its message ("Unsupported global: GLOBAL pkg.Class ...", "unsupported GLOBAL
        # os.system ..."). Other refusals (an unknown opcode) mean a damaged or foreign file.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is None:
            detail = next((line for line in lines if "Unsupported operand" in line), lines[0] if lines else repr(e))
            raise WeightsError(f"{s}: not a readable torch checkpoint (weights-only unpickler: {detail})") from e
        raise UnsafeCheckpointError(
            f"{s}: refusing this checkpoint: it needs pickle to load (it holds objects other than tensors and plain "
            f"containers), and unpickling can run arbitrary code. Re-save it as a plain state_dict "
            f"(torch.save(model.state_dict(), path)). torch said: {detail}"
        ) from e
    except FileNotFoundError as e:
        raise WeightsError(f"{s}: no such checkpoint file") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{s}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model state_dict inside a loaded checkpoint.

    Accepts a raw state_dict, or a dict holding it under ``model`` (our training checkpoints) or ``state_dict``.
    Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are removed when every key carries them.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: not a state_dict (a non-empty mapping of names to tensors), nor a dict "
                           f"holding one under 'model' or 'state_dict'")
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: not a state_dict: key {key!r} holds a {type(value).__name__}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


_WEAK_LAYOUT_PREFIXES = ("backbone.", "weak_head.")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load `state` into `model`; every key and shape must match, else `WeightsError` listing what differs.

    The one tolerance: missing BatchNorm ``num_batches_tracked`` counters (absent from older checkpoints; they
    only matter for momentum=None). A `WeakHeadModel` layout is matched as described on that class.
    """
    has_weak = any(k.startswith("weak_head.") for k in state)
    if isinstance(model, WeakHeadModel) and not has_weak:
        model = model.backbone  # a plain checkpoint initialises the backbone; the weak head stays as built
    elif not isinstance(model, WeakHeadModel) and has_weak and all(k.startswith(_WEAK_LAYOUT_PREFIXES) for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_list(mismatched)}")
        raise WeightsError("; ".join(parts))
    model.load_state_dict(state, strict=False)  # strictness checked above, with the num_batches_tracked tolerance


def _torchvision_weights(src: str, arch: str | None):
    """Resolve a torchvision weights name: ``Enum.MEMBER`` alone, or a member name (``IMAGENET1K_V1``,
    ``DEFAULT``) of `arch`'s weights enum."""
    from torchvision.models import get_model_weights, get_weight

    tv_names = _torchvision_names()
    if "." in src:
        try:
            weights = get_weight(src)
        except (ValueError, KeyError, AttributeError) as e:
            raise WeightsError(f"{src!r}: neither an existing file nor a torchvision weights name") from e
        if arch is not None and arch in tv_names and not isinstance(weights, get_model_weights(arch)):
            raise WeightsError(f"{src} are weights for another architecture than {arch}")
        return weights
    if arch is None or arch not in tv_names:
        raise WeightsError(
            f"{src!r} is not an existing file; as a torchvision weights name it needs a torchvision architecture "
            f"(got {arch!r}), or write it in full, e.g. ResNet34_Weights.IMAGENET1K_V1"
        )
    enum = get_model_weights(arch)
    try:
        return enum.verify(src)
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(
            f"{src!r} is not an existing file, nor weights of {arch} (known: {', '.join(m.name for m in enum)})"
        ) from e


def _torchvision_weights_file(weights) -> str:
    """Local path of torchvision `weights` in torch hub's cache, downloaded (hash-checked) when absent."""
    filename = os.path.basename(urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        match = _HASH_IN_FILENAME.search(filename)
        try:  # writes a temporary file and renames it: a failed download leaves nothing behind
            torch.hub.download_url_to_file(weights.url, path, hash_prefix=match.group(1) if match else None,
                                           progress=False)
        except Exception as e:  # noqa: BLE001 - any failure (no network, HTTP error, bad hash) is reported the same
            raise WeightsError(
                f"could not download torchvision weights {weights} from {weights.url} ({type(e).__name__}: {e}). "
                f"Without network access, copy that file to {path} or pass a local checkpoint file."
            ) from e
    return path


def load_weights(model: nn.Module, src: str | os.PathLike, *, arch: str | None = None) -> nn.Module:
    """Load weights into `model` in place (and return it), strictly.

    `src`: a checkpoint file (path or fsspec URL; see `load_checkpoint` / `extract_state_dict`), or a torchvision
    weights name: ``ResNet34_Weights.IMAGENET1K_V1``, or ``IMAGENET1K_V1`` / ``DEFAULT`` with ``arch`` naming the
    torchvision architecture. Torchvision files are downloaded into torch hub's cache when absent and read with
    ``weights_only=True`` like any other file; a failed download raises `WeightsError`.
    """
    if _is_file_source(src):
        source = os.fspath(src)
        state = extract_state_dict(load_checkpoint(source), source=source)
    else:
        weights = _torchvision_weights(os.fspath(src), arch)
        path = _torchvision_weights_file(weights)
        source = f"{weights} ({path})"
        state = extract_state_dict(load_checkpoint(path), source=source)
    load_state_dict_strict(model, state, source=source)
    return model


def weights_digest(src: str | os.PathLike, *, arch: str | None = None) -> str:
    """An identifier of the weights' content, recorded in caches and runs.

    Files (paths or fsspec URLs): the sha256 hex digest of the file's bytes. Torchvision names:
    ``torchvision:<Enum>.<MEMBER>:<hash>``, where <hash> is the sha256 prefix in the URL's file name
    (``resnet34-b627a593.pth``), which torchvision checks on download; this needs no network.
    """
    if _is_file_source(src):
        s = os.fspath(src)
        digest = hashlib.sha256()
        try:
            if "://" in s and not s.startswith("file://"):
                import fsspec

                opener = fsspec.open(s, "rb")
            else:
                opener = open(s[len("file://") :] if s.startswith("file://") else s, "rb")  # noqa: SIM115
            with opener as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError as e:
            raise WeightsError(f"{s}: no such checkpoint file") from e
        return digest.hexdigest()
    weights = _torchvision_weights(os.fspath(src), arch)
    match = _HASH_IN_FILENAME.search(os.path.basename(urlparse(weights.url).path))
    return f"torchvision:{weights}:{match.group(1) if match else 'nohash'}"
