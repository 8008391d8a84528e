"""Decoding one raw sample: image bytes -> uint8 (3, H, W) RGB, ``.cls`` -> label; any failure is a
`BadSampleError` naming url:key. Decoder: torchvision.io (libjpeg-turbo), measured 1.25-1.46x faster than PIL
with bit-identical pixels; PIL is the fallback (builds without image ops). 16-bit samples are scaled to 8 bits,
never clipped. The image-size limit (`max_image_pixels`, ``$LOGITCACHE_MAX_IMAGE_PIXELS``) is checked on the
header before anything is decoded."""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from typing import Any

import numpy as np
import torch

from logitcache.errors import BadSampleError, DataError
from logitcache.runtime.bounded import MAX_SAMPLE_JSON_BYTES, check_length

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several

# torchvision 0.29 marks its decoders deprecated (in favour of torchcodec) but they are still the fastest here;
# the warning would otherwise repeat for every image under pytest's default filters.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


DECODER = "torchvision"  # or "pil"; see the module docstring


def parse_label(data: bytes | None) -> int:
    """The integer in a ``.cls`` member; ValueError (with the reason) when missing or not an integer."""
    if data is None:
        raise ValueError("no .cls label")
    text = data.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f".cls is not an integer: {text[:32]!r}")
    return int(text)


#: the documented image-size limit (README, "Limits"): an image whose header declares more pixels is refused
#: before it is decoded (a 30000x30000 JPEG would take 2.7 GB); override with this environment variable
MAX_IMAGE_PIXELS_ENV = "LOGITCACHE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 px, e.g. 8192 x 8192 (ImageNet's largest is ~ 4.5 Mpx... 20 Mpx)


def max_image_pixels() -> int:
    """The image-size limit in pixels: ``$LOGITCACHE_MAX_IMAGE_PIXELS``, else `DEFAULT_MAX_IMAGE_PIXELS`."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if text is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{MAX_IMAGE_PIXELS_ENV}={text!r} is not an integer number of pixels") from None
    if value < 1:
        raise DataError(f"{MAX_IMAGE_PIXELS_ENV}={text!r} must be >= 1")
    return value


def check_image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the image's header (nothing decoded); ValueError when they exceed
    `max_image_pixels` (so a declared 30000 x 30000 costs nothing) or the header cannot be read."""
    from PIL import Image

    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:  # past PIL's own limit: read the size from the header ourselves
        size = _header_size(data)
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]}" if size else f"more than {2 * Image.MAX_IMAGE_PIXELS}"
        raise ValueError(f"the header declares {what} pixels, over the limit of {limit} ({MAX_IMAGE_PIXELS_ENV}); "
                         "not decoded") from None
    if width * height > limit:
        raise ValueError(f"the header declares {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limit} ({MAX_IMAGE_PIXELS_ENV}); not decoded")
    return width, height


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's SOF marker, without decoding; None for other layouts."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + length
    return None


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """16-bit samples scaled to 8 bits (rounded: 0 -> 0, 32768 -> 128, 65535 -> 255), never clipped."""
    return ((x.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def decode_image(data: bytes, decoder: str = DECODER) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W) RGB (grayscale/CMYK/palette converted, alpha dropped, 16-bit samples
    scaled to 8 bits). The header's size is checked against `max_image_pixels` first. Raises on bad bytes."""
    if not data:
        raise ValueError("empty image")
    if decoder not in ("torchvision", "pil"):
        raise ValueError(f"unknown decoder {decoder!r}; use 'torchvision' or 'pil'")
    check_image_size(data)
    if decoder == "torchvision" and _tv_decode is not None:
        try:
            x = _tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_TV_RGB)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[-1]) from e
        if x.dtype == torch.uint8:
            return x
        if x.dtype == torch.uint16:  # 16-bit PNG
            return torch.from_numpy(_to_uint8(x.to(torch.int32).numpy()))
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grayscale: PIL's convert("RGB") would clip
            gray = _to_uint8(np.clip(np.array(im), 0, 65535))
            return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape))))
        rgb = im.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # channels-last memory, as torchvision decodes


try:  # torchvision without image ops (or a future one without them) falls back to PIL
    from torchvision.io import ImageReadMode as _ImageReadMode
    from torchvision.io import decode_image as _tv_decode
    from torchvision.io.image import _has_image_ops

    _TV_RGB = _ImageReadMode.RGB
    if not _has_image_ops():
        _tv_decode = None
except ImportError:  # pragma: no cover
    _tv_decode, _TV_RGB = None, None


def json_label(data: bytes | None, label_key: str) -> int:
    """The integer at dotted path ``label_key`` (``label``, ``meta.label``; a list index as a number, e.g.
    ``labels.0``) in a ``.json`` member; ValueError (with the reason) when missing or not an integer."""
    if data is None:
        raise ValueError(f"no .json member (labels are read from its {label_key!r})")
    check_length(len(data), MAX_SAMPLE_JSON_BYTES, name="its .json member", what="sample's .json", error=ValueError)
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f".json is not valid JSON ({e})") from None
    for part in label_key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"\d+", part) and int(part) < len(value):
            value = value[int(part)]
        else:
            raise ValueError(f".json has no {label_key!r} (stopped at {part!r})")
    if isinstance(value, bool) or not isinstance(value, int | str) or not re.fullmatch(r"[+-]?\d+", str(value)):
        raise ValueError(f".json {label_key!r} is not an integer: {str(value)[:32]!r}")
    return int(value)


def sample_label(raw: dict[str, Any], label_key: str | None = None) -> int:
    """A raw sample's label: its ``.cls`` member, or with ``label_key`` the integer at that path in its ``.json``."""
    return parse_label(raw.get("cls")) if label_key is None else json_label(raw.get("json"), label_key)


def decode_sample(raw: dict[str, Any], num_classes: int, decoder: str = DECODER, *, label_key: str | None = None
                  ) -> tuple[torch.Tensor, int]:
    """Stage body: a raw sample -> ``(image, label)``; any problem raises `BadSampleError` naming url:key.
    ``label_key``: the label is read from the ``.json`` member at this path (see `sample_label`)."""
    url, key = raw["__url__"], raw["__key__"]
    try:
        label = sample_label(raw, label_key)
    except ValueError as e:
        member = "cls" if label_key is None else "json"
        raise BadSampleError(url, key, str(e), "bad label" if member in raw else "no label") from None
    if not 0 <= label < num_classes:
        raise BadSampleError(url, key, f"label {label} outside [0, {num_classes})", "label out of range")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        parts = sorted(k for k in raw if not k.startswith("__"))
        raise BadSampleError(url, key, f"no image (.jpg/.jpeg/.png/.webp); members: {parts}", "no image")
    try:
        image = decode_image(raw[ext], decoder)
    except Exception as e:  # every decoder failure (PIL raises many types) is this sample's fault
        raise BadSampleError(url, key, f"cannot decode .{ext}: {type(e).__name__}: {e}", "bad image") from None
    return image, label


def sniff_image_type(data: bytes) -> str | None:
    """The extension the bytes really are (ImageNet has a PNG named .JPEG): jpg, png, webp or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


