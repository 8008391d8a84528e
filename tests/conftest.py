"""Shared fixtures: tiny synthetic datasets written by our own shard writer (real JPEG/PNG bytes, a manifest).

- ``imagenet_shards``: 3 shards x 8 samples of RGB JPEGs 40-64 px per side, labels over 1000 classes.
- ``small_shards``: 2 shards x 12 samples of 28x28 grayscale PNGs, 10 classes (Fashion-MNIST style).
- ``fashion_mnist_idx``: a directory with tiny synthetic Fashion-MNIST IDX .gz files (train 24, test 8).

All are session-scoped and read-only: copy them (``shutil.copytree``) before damaging anything.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from _data_helpers import IMAGENET_NUM_CLASSES, imagenet_like_samples, make_png_gray, write_idx

IMAGENET_SHARDS, IMAGENET_PER_SHARD = 3, 8
SMALL_NUM_CLASSES = 10
SMALL_SHARDS, SMALL_PER_SHARD = 2, 12


@pytest.fixture(scope="session")
def imagenet_shards(tmp_path_factory) -> pathlib.Path:
    """Directory with 3 ImageNet-style shards (8 JPEGs each, 40-64 px, 1000 classes) and manifest.json."""
    from logitcache.data.write import write_shards

    out = tmp_path_factory.mktemp("imagenet_shards")
    write_shards(
        imagenet_like_samples(IMAGENET_SHARDS * IMAGENET_PER_SHARD), out,
        class_names=[f"n{i:08d}" for i in range(IMAGENET_NUM_CLASSES)], samples_per_shard=IMAGENET_PER_SHARD,
    )
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> pathlib.Path:
    """Directory with 2 shards of 12 grayscale 28x28 PNGs each (10 classes) and manifest.json."""
    from logitcache.data.convert.fashion_mnist import FASHION_MNIST_CLASSES
    from logitcache.data.write import write_shards

    rng = np.random.default_rng(1)
    samples = (
        (f"small{i:05d}", {"png": make_png_gray(rng), "cls": str(i % SMALL_NUM_CLASSES).encode()})
        for i in range(SMALL_SHARDS * SMALL_PER_SHARD)
    )
    out = tmp_path_factory.mktemp("small_shards")
    write_shards(samples, out, class_names=FASHION_MNIST_CLASSES, samples_per_shard=SMALL_PER_SHARD)
    return out


@pytest.fixture(scope="session")
def fashion_mnist_idx(tmp_path_factory) -> pathlib.Path:
    """Synthetic Fashion-MNIST IDX files (train: 24 images, test: 8) under their real file names."""
    rng = np.random.default_rng(2)
    d = tmp_path_factory.mktemp("fashion_mnist_idx")
    for prefix, n in (("train", 24), ("t10k", 8)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return d
