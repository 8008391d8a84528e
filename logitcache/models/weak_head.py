"""USKD's weak head: `WeakHeadModel` wraps a model and adds ``Linear(pool(F))`` on a mid-level feature F captured
by a forward hook; ``forward`` returns ``(logits, weak_logits)``. Default sites per family live in `zoo`."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import Tensor, nn

from logitcache.errors import ModelError


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


#: how a captured mid feature is pooled to a vector: NCHW map, NHWC map (Swin), token sequence (N, S, D).
WeakLayout = Literal["nchw", "nhwc", "cls_token", "token_mean"]


_LAYOUTS = ("nchw", "nhwc", "cls_token", "token_mean")


