"""The one mixed-precision / memory-format policy, used by the teacher runner, the training step and evaluation.

Teacher (``--teacher-precision``, recorded in the cache group's metadata, `schema.GroupMeta.teacher_precision`):
    fp32   float32 throughout; on a GPU with TF32 off during the forward, so "fp32" means float32 products
    bf16   the body under ``torch.autocast(device, bfloat16)``
    fp16   the body under ``torch.autocast(device, float16)``
Whatever the body's precision, its logits are cast to float32 before anything is reduced from them (top-k,
log-partition, the true-class log-probability: `TopKLogits.from_logits`; the online-KD losses). Default: bf16 on a
GPU (the fast path), fp32 elsewhere (on a CPU bf16 saves little, fp16 autocast is slow, and caches made on CPUs
stay what they always were).

Student training: channels_last under bf16 autocast on a GPU (AMP), float32 on a CPU; losses from float32 logits.
Evaluation and validation: float32 on every device (`eval_autocast`), so NLL, ECE and AURC come from float32
logits, not from bf16 ones cast up.

`recompute_tolerance`: ``verify --recompute``'s default tolerance, from `MEASURED_ERROR`, the largest error of
cached values against a float32 teacher that ``pipelines/bench_precision.py`` measures per precision (FORMAT.md
"Teacher precision").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

TEACHER_PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: largest |cached value - float32 teacher's| (nats; cached top-k log-probs at their classes, and the true-class
#: log-prob) per teacher precision: 1.25 x what ``pipelines/bench_precision.py`` measured (CPU, 256 views,
#: resnet18 calibrated to a trained teacher's logit spread; FORMAT.md), rounded up to 2 significant digits.
#: fp32 is an allowance for another device's float32 (other kernels, other summation orders), not a
#: measurement: on one CPU two float32 runs differ by ~1e-6.
MEASURED_ERROR = {"fp32": 0.005, "bf16": 0.45, "fp16": 0.049}


def is_cuda(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


# ---------------------------------------------------------------- the teacher
def check_teacher_precision(value: str) -> str:
    if value not in TEACHER_PRECISIONS:
        raise ValueError(f"--teacher-precision must be one of {'|'.join(TEACHER_PRECISIONS)}, got {value!r}")
    return value


def default_teacher_precision(device: str | torch.device) -> str:
    """bf16 on a GPU, fp32 elsewhere."""
    return "bf16" if is_cuda(device) else "fp32"


def resolve_teacher_precision(value: str | None, device: str | torch.device) -> str:
    """``value`` checked, or the device's default when None."""
    return default_teacher_precision(device) if value is None else check_teacher_precision(value)


@contextlib.contextmanager
def _float32_products() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN inside (PyTorch lets cuDNN convolutions use TF32 by default)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def teacher_autocast(value: str, device: str | torch.device):
    """The context a teacher's body runs in at precision ``value`` on ``device``."""
    check_teacher_precision(value)
    if value == "fp32":
        return _float32_products() if is_cuda(device) else contextlib.nullcontext()
    return torch.autocast("cuda" if is_cuda(device) else torch.device(device).type, dtype=_AUTOCAST_DTYPES[value])


def recompute_tolerance(cache_precision: str, recompute_precision: str) -> float:
    """``verify --recompute``'s default tolerance (nats): the cached values and the recomputed ones each differ from
    a float32 teacher by up to their precision's `MEASURED_ERROR`. The stored dtype's rounding is allowed on top,
    per value (`storage_rounding`)."""
    return (MEASURED_ERROR[check_teacher_precision(cache_precision)]
            + MEASURED_ERROR[check_teacher_precision(recompute_precision)])


def storage_rounding(values: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """Half a unit in the last place of ``value_dtype`` at each (stored) value: the most storing changed it."""
    bits = {"float16": 11, "float32": 24, "bfloat16": 8}.get(value_dtype)
    if bits is None:
        raise ValueError(f"unknown value dtype {value_dtype!r}")
    tiny = {"float16": 2.0**-25, "float32": 2.0**-150, "bfloat16": 2.0**-134}[value_dtype]
    return values.abs() * 2.0**-bits + tiny


# ---------------------------------------------------------------- the student and evaluation
def autocast(device: str | torch.device):
    """Training's forward context on ``device``: bf16 autocast on GPUs (AMP), none on CPUs."""
    if is_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_autocast(device: str | torch.device):
    """Evaluation's forward context: float32 on every device, TF32 off on GPUs (metrics from float32 logits)."""
    return _float32_products() if is_cuda(device) else contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a model to ``device`` in the policy's memory format (channels_last on GPUs)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if is_cuda(device) else model


def prepare_input(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A normalised input batch in the policy's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if is_cuda(device) else x


def normalize_on_device(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        device: str | torch.device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std`` on ``device`` (copied without blocking), in the
    policy's memory format. ``mean``/``std`` are (1, 3, 1, 1) tensors on ``device``."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return prepare_input(x, device)


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (how `MEASURED_ERROR` is derived from a measurement)."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(round(x * scale, 9)) / scale
