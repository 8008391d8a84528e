"""Weights in: safetensors files (recommended; no pickle at all), torch state-dict files (``weights_only=True``;
anything that needs pickle is refused), torchvision weights names, and Hugging Face Hub weights of timm models
(``hf-hub:OWNER/REPO`` or ``pretrained``; local cache first, a clear error without network). Loading is strict
(`load_state_dict_strict`); `state_dict_digest` identifies the weights actually loaded, whatever file they came
from, and is what caches record.
"""

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

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar", ".safetensors")
HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hugging Face Hub repository
PRETRAINED_NAMES = ("pretrained", "DEFAULT")  # a timm model's default pretrained weights (on the Hub)


_HASH_IN_FILENAME = re.compile(r"-([a-f0-9]+)\.")


def _is_file_source(src: str | os.PathLike) -> bool:
    """A path or URL (an existing path always wins), as opposed to a torchvision weights name or a hub name."""
    s = os.fspath(src)
    if s.startswith(HUB_PREFIX) and not os.path.exists(s):
        return False
    return "://" in s or "/" in s or os.sep in s or s.lower().endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(s)


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes open a safetensors file: a little-endian u64 header length, then ``{``.
    (Torch checkpoints start with a zip header ``PK\\x03\\x04`` or a pickle protocol byte ``\\x80``.)"""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _load_safetensors(path_or_bytes: str | bytes, source: str) -> dict[str, Tensor]:
    """A safetensors file as a state_dict: a JSON header and raw tensor bytes, parsed without pickle."""
    try:
        from safetensors.torch import load, load_file
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise WeightsError(f"{source}: reading .safetensors needs the safetensors package (pip install safetensors)"
                           ) from e
    try:
        state = load(path_or_bytes) if isinstance(path_or_bytes, bytes) else load_file(path_or_bytes, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) on bad files
        raise WeightsError(f"{source}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return dict(state)


def load_checkpoint(src: str | os.PathLike) -> Any:
    """Read a weights file (local path or fsspec URL): no code ever runs.

    A ``.safetensors`` file (recognised by its bytes, whatever its name) is parsed by safetensors: a JSON header
    and raw tensors, no pickle at all; this is the format we recommend. Anything else is a torch checkpoint,
    read with ``weights_only=True``: this is the one place in logitcache that calls `torch.load`. A torch file that
    needs pickle (custom classes, functions) raises `UnsafeCheckpointError`; a missing or unreadable file raises
    `WeightsError`.
    """
    s = os.fspath(src)
    try:
        if "://" in s and not s.startswith("file://"):
            import fsspec

            with fsspec.open(s, "rb") as f:
                data = f.read()
            if is_safetensors(data[:9]):
                return _load_safetensors(data, s)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        path = s[len("file://") :] if s.startswith("file://") else s
        with open(path, "rb") as f:
            if is_safetensors(f.read(9)):
                return _load_safetensors(path, s)
            f.seek(0)  # a file object, not the name: torch >= 2.14 hands names ending in .safetensors to safetensors
            return torch.load(f, map_location="cpu", weights_only=True)
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


def is_hub_source(src: str | os.PathLike, arch: str | None) -> bool:
    """``hf-hub:<repo>``, or ``pretrained`` / ``DEFAULT`` for a ``timm:`` architecture (not an existing file)."""
    s = os.fspath(src)
    if _is_file_source(s):
        return False
    return s.startswith(HUB_PREFIX) or (s in PRETRAINED_NAMES and (arch or "").startswith("timm:"))


def hub_repo(src: str, arch: str | None) -> str:
    """The Hub repository of ``hf-hub:<repo>``, or of a timm architecture's default pretrained weights."""
    if src.startswith(HUB_PREFIX):
        repo = src[len(HUB_PREFIX) :]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise WeightsError(f"{src!r}: a Hub name is hf-hub:<owner>/<repository>, e.g. hf-hub:timm/resnet50.a1_in1k")
        return repo
    try:
        import timm
    except ImportError as e:
        raise WeightsError(f"{src!r} weights for {arch} need timm, which is not installed: pip install timm") from e
    name = (arch or "")[len("timm:") :]
    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises several kinds for unknown names
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(f"timm knows no Hub weights for {name!r}: pass a local weights file (--weights FILE)")
    return repo


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub repositories hold, in our preference


def hub_weights_file(repo: str) -> str:
    """Local path of a Hub repository's weights (``model.safetensors``, else ``pytorch_model.bin``).

    The local Hugging Face cache is looked at first (no network); otherwise the file is downloaded, unless
    ``HF_HUB_OFFLINE=1``. Any failure raises `WeightsError` saying that a local file is needed and how to get one:
    a cluster node without network access should be given ``--weights /path/to/model.safetensors``.
    """
    how = (f"This needs a local file: where there is network, run `huggingface-cli download {repo} model.safetensors` "
           f"(or fetch https://huggingface.co/{repo}/resolve/main/model.safetensors), copy it here and pass "
           f"--weights /path/to/model.safetensors")
    try:
        import huggingface_hub
    except ImportError as e:
        raise WeightsError(f"{HUB_PREFIX}{repo}: Hub weights need huggingface_hub (not installed). {how}") from e
    for filename in HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
        except Exception:  # noqa: BLE001,S112 - not in the cache (or no such file): try the next, then the network
            continue
    if _hf_offline():
        raise WeightsError(f"{HUB_PREFIX}{repo}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    problem: Exception | None = None
    for filename in HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo, filename)
        except Exception as e:  # noqa: BLE001 - no network, no such repository, ...: all need the same advice
            problem = e
            errors = huggingface_hub.errors
            if not (isinstance(e, errors.EntryNotFoundError) and not isinstance(e, errors.LocalEntryNotFoundError)):
                break  # only "the repository has no such file" is worth trying the next name for
    raise WeightsError(f"{HUB_PREFIX}{repo}: could not get its weights from the Hugging Face Hub "
                       f"({type(problem).__name__}: {str(problem).splitlines()[0] if str(problem) else ''}). {how}")


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

    `src`: a weights file (``.safetensors`` or a torch checkpoint; path or fsspec URL; see `load_checkpoint` /
    `extract_state_dict`), a Hub name for timm models (``hf-hub:timm/<name>``, or ``pretrained`` for the model's
    default; see `hub_weights_file`), or a torchvision weights name: ``ResNet34_Weights.IMAGENET1K_V1``, or
    ``IMAGENET1K_V1`` / ``DEFAULT`` with ``arch`` naming the torchvision architecture. Torchvision files are
    downloaded into torch hub's cache when absent and read with ``weights_only=True`` like any
    other file; a failed download raises `WeightsError`.
    """
    if _is_file_source(src):
        source = os.fspath(src)
        state = extract_state_dict(load_checkpoint(source), source=source)
    elif is_hub_source(src, arch):
        repo = hub_repo(os.fspath(src), arch)
        path = hub_weights_file(repo)
        source = f"{HUB_PREFIX}{repo} ({path})"
        state = extract_state_dict(load_checkpoint(path), source=source)
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
