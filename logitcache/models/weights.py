"""Weights: the one `torch.load` of the package (`load_checkpoint`, always ``weights_only=True``), state-dict
extraction and strict loading, torchvision weight names, and `state_dict_digest` — the one weights digest, over
the tensors actually used, recorded in caches and compared by ``verify --recompute``."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from logitcache.errors import UnsafeCheckpointError, WeightsError
from logitcache.models.weak_head import WeakHeadModel

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
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises anything (IndexError on text files)
        raise WeightsError(f"{s}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


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


# ------------------------------------------------------------------ teacher
def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes): the weights actually used."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()




def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)
