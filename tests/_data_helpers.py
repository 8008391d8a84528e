"""Synthetic image bytes and IDX files for the data tests (used by conftest's fixtures and by tests directly)."""

from __future__ import annotations

import gzip
import io
import os

import numpy as np

IMAGENET_NUM_CLASSES = 1000


def make_jpeg(rng: np.random.Generator, height: int, width: int, quality: int = 90) -> bytes:
    """A smooth random RGB picture (compresses like a photo, not like noise) as JPEG bytes."""
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_png_gray(rng: np.random.Generator, size: int = 28) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def imagenet_like_samples(n: int, seed: int = 0, num_classes: int = IMAGENET_NUM_CLASSES):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 65, size=2))
        yield f"img{i:05d}", {"jpg": make_jpeg(rng, h, w), "cls": str(int(rng.integers(0, num_classes))).encode()}


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
