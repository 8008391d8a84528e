"""Image-folder trees (``SRC/<class>/*.JPEG``, ImageNet's train/) to shards; bytes copied as they are."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from logitcache.data.decode import sniff_image_type
from logitcache.data.manifest import Manifest
from logitcache.data.write import write_shards
from logitcache.errors import (
    DataError,
)

# ------------------------------------------------------------------ ImageFolder trees (ImageNet train/<wnid>/*.JPEG)
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def image_folder_classes(src: str | os.PathLike) -> list[str]:
    """Class names = the sorted subdirectory names of ``src`` (hidden ones left out); index = position."""
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a directory")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{src}: no class subdirectories (expected SRC/<class>/<image>)")
    return classes


def image_folder_samples(
    src: str | os.PathLike, *, shuffle_seed: int | None = 0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {"jpg"|"png"|"webp", "cls"})`` for every image under ``src/<class>/`` (recursively).

    Bytes are copied as they are (never re-encoded); the extension follows the bytes, not the file name.
    Key = ``<class>/<path without extension>`` with dots replaced by ``_``. Files are listed in sorted order,
    then shuffled with ``shuffle_seed`` (None: keep class order) so that each shard mixes classes.
    """
    src = os.fspath(src)
    classes = image_folder_classes(src)
    files: list[tuple[str, str, int]] = []
    for label, cls in enumerate(classes):
        root = os.path.join(src, cls)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.lower().endswith(FOLDER_EXTENSIONS) and not fn.startswith("."):
                    path = os.path.join(dirpath, fn)
                    rel = os.path.splitext(os.path.relpath(path, src))[0].replace(os.sep, "/")
                    files.append((path, rel.replace(".", "_"), label))
    if not files:
        raise DataError(f"{src}: no images ({'/'.join(FOLDER_EXTENSIONS)}) under its class directories")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
        files = [files[i] for i in order]
    for path, key, label in files:
        with open(path, "rb") as f:
            data = f.read()
        ext = sniff_image_type(data)
        if ext is None:
            raise DataError(f"{path}: not a JPEG, PNG or WebP file (starts with {data[:8].hex()})")
        yield key, {ext: data, "cls": str(label).encode()}


def write_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
) -> Manifest:
    """Shards + manifest from an ImageFolder tree; class index = sorted class-directory order."""
    return write_shards(
        image_folder_samples(src, shuffle_seed=shuffle_seed), out, class_names=image_folder_classes(src),
        samples_per_shard=samples_per_shard, max_bytes=max_bytes, overwrite=overwrite,
    )


