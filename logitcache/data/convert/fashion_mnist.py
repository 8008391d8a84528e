"""Fashion-MNIST from its IDX files to shards: lossless grayscale PNGs, the 10 class names, file order kept."""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator

import numpy as np

from logitcache.data.manifest import Manifest
from logitcache.data.write import write_shards
from logitcache.errors import (
    DataError,
)

# ------------------------------------------------------------------ Fashion-MNIST (IDX files)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


#: what the converter records as the data's default view recipe (28 px grayscale: the small recipe, unscaled)
FASHION_MNIST_RECIPE = {"name": "small", "image_size": 28}
FASHION_MNIST_DEFAULT_SRC = "/usr/share/datasets/fashion-mnist/"


_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or raw) of unsigned bytes as a numpy array; a malformed file raises DataError."""
    p = os.fspath(path)
    try:
        with (gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{p}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{p}: IDX header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{p}: IDX body has {len(body)} bytes, shape {shape} needs {int(np.prod(shape))}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(src: str, name: str) -> str:
    for candidate in (os.path.join(src, name + ".gz"), os.path.join(src, name)):
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{src}: no {name}(.gz) here (expected the Fashion-MNIST IDX files)")


def fashion_mnist_samples(src: str | os.PathLike, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {"png", "cls"})`` for a split ("train"/"test"), in file order; images as lossless grayscale PNG."""
    from PIL import Image

    src = os.fspath(src)
    images_file, labels_file = (_find(src, n) for n in _FASHION_MNIST_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_file} {images.shape} and {labels_file} {labels.shape} do not pair up")
    for i in range(len(images)):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        yield f"{split}-{i:06d}", {"png": buf.getvalue(), "cls": str(int(labels[i])).encode()}


def write_fashion_mnist(
    src: str | os.PathLike = FASHION_MNIST_DEFAULT_SRC,
    out: str | os.PathLike = "fashion-mnist",
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Shards for both splits: ``OUT/train`` and ``OUT/test``, each with its manifest."""
    out = os.fspath(out).rstrip("/")
    return {
        split: write_shards(
            fashion_mnist_samples(src, split), f"{out}/{split}", class_names=FASHION_MNIST_CLASSES,
            samples_per_shard=samples_per_shard, max_bytes=max_bytes, overwrite=overwrite,
            default_recipe=FASHION_MNIST_RECIPE,
        )
        for split in ("train", "test")
    }


