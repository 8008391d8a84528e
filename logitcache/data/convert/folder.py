"""Shards from image folders: an ImageFolder tree (ImageNet's ``train/<wnid>/*.JPEG``) or a flat folder with a
labels file (ImageNet's validation layout, ``val/ILSVRC2012_val_00000001.JPEG`` ...).

Image bytes are copied as they are (never re-encoded); a member's extension follows the bytes, not the file
name. The files are listed and their shards planned from their sizes first (`plan_shards`), then written by
``workers`` processes (`write_planned_shards`): the shards are the same bytes for any worker count.

Labels for a flat folder (`read_labels_file`), one of:

  * ``name label`` lines (whitespace or comma separated; Caffe's ``val.txt`` is this): name = the file name or
    its stem, label = a class index or a class name (e.g. the synset ``n01440764``);
  * Kaggle's ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``): the first synset of each row;
  * the ImageNet devkit's ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID (1-1000) per line for
    the images in name order; the IDs are mapped to synsets with the devkit's ``data/meta.mat``, looked for next
    to the file (`devkit_synsets`).

Class names: given (``class_names``), else the synsets' sorted order when the labels are names (ImageNet's
1000 synsets sorted = the ImageFolder order of ``train/``), else ``"0".."C-1"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from logitcache.data.convert.matfile import read_mat_struct
from logitcache.data.decode import sniff_image_type
from logitcache.data.manifest import Manifest
from logitcache.data.write import plan_shards, tar_bytes, write_planned_shards
from logitcache.errors import DataError

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


def _is_image_name(fn: str) -> bool:
    return fn.lower().endswith(FOLDER_EXTENSIONS) and not fn.startswith(".")


def _key(src: str, path: str) -> str:
    rel = os.path.splitext(os.path.relpath(path, src))[0].replace(os.sep, "/")
    return rel.replace(".", "_")


def image_folder_files(src: str | os.PathLike, *, shuffle_seed: int | None = 0) -> list[tuple[str, str, int]]:
    """``(path, key, label)`` for every image under ``src/<class>/`` (recursively), sorted, then shuffled with
    ``shuffle_seed`` (None: keep class order) so that each shard mixes classes. Key = ``<class>/<path without
    extension>`` with dots replaced by ``_``."""
    src = os.fspath(src)
    classes = image_folder_classes(src)
    files: list[tuple[str, str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(src, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if _is_image_name(fn):
                    path = os.path.join(dirpath, fn)
                    files.append((path, _key(src, path), label))
    if not files:
        raise DataError(f"{src}: no images ({'/'.join(FOLDER_EXTENSIONS)}) under its class directories")
    return _shuffled(files, shuffle_seed)


def _shuffled(files: list, shuffle_seed: int | None) -> list:
    if shuffle_seed is None:
        return files
    order = np.random.default_rng(shuffle_seed).permutation(len(files))
    return [files[i] for i in order]


def load_image_file(item: tuple[str, str, int]) -> tuple[str, dict[str, bytes]]:
    """``(path, key, label)`` -> ``(key, {"jpg"|"png"|"webp": bytes, "cls": label})``; other bytes -> DataError."""
    path, key, label = item
    with open(path, "rb") as f:
        data = f.read()
    ext = sniff_image_type(data)
    if ext is None:
        raise DataError(f"{path}: not a JPEG, PNG or WebP file (starts with {data[:8].hex()})")
    return key, {ext: data, "cls": str(label).encode()}


def image_folder_samples(
    src: str | os.PathLike, *, shuffle_seed: int | None = 0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {"jpg"|"png"|"webp", "cls"})`` for every image of an ImageFolder tree (see `image_folder_files`)."""
    for item in image_folder_files(src, shuffle_seed=shuffle_seed):
        yield load_image_file(item)


# ------------------------------------------------------------------ flat folder + labels file (ImageNet val)
def devkit_synsets(meta_mat: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the ImageNet devkit's ``data/meta.mat`` (the 1000 leaf synsets)."""
    try:
        synsets = read_mat_struct(meta_mat, "synsets")
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_mat}: cannot read the devkit's synsets ({type(e).__name__}: {e})") from e
    out = {}
    for s in synsets:
        try:
            ident, wnid = int(s["ILSVRC2012_ID"]), str(s["WNID"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_mat}: a synset lacks ILSVRC2012_ID / WNID ({e})") from e
        if int(s.get("num_children", 0) or 0) == 0:
            out[ident] = wnid
    if not out:
        raise DataError(f"{meta_mat}: no leaf synsets in it")
    return out


def read_labels_file(path: str, names: Sequence[str]) -> list[str]:
    """The label text of each image file name in ``names`` (sorted file names of a flat folder), from a labels
    file in one of the formats of the module docstring. Labels are returned as text (an index or a name)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f.read().splitlines()]
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such labels file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text labels file ({e})") from e
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{path}: the labels file is empty")
    stems = {os.path.splitext(n)[0]: n for n in names}
    if re.match(r"(?i)imageid\s*,\s*predictionstring", lines[0]):  # Kaggle's LOC_val_solution.csv
        rows = [ln.split(",", 1) for ln in lines[1:]]
        by_name = {r[0].strip(): (r[1].split() or [""])[0] for r in rows if len(r) == 2}
    elif all(re.fullmatch(r"\d+", ln) for ln in lines):  # the devkit's ground truth: IDs, one per image in order
        if len(lines) != len(names):
            raise DataError(f"{path}: {len(lines)} labels for {len(names)} images (a devkit ground-truth file has "
                            "one ILSVRC2012_ID per validation image, in file-name order)")
        meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.mat")
        if not os.path.exists(meta):
            raise DataError(f"{path} holds ILSVRC2012_IDs, which only the devkit's meta.mat maps to synsets; "
                            f"expected it at {meta} (the devkit's data/ folder holds both)")
        ids = devkit_synsets(meta)
        unknown = sorted({int(ln) for ln in lines} - set(ids))
        if unknown:
            raise DataError(f"{path}: ILSVRC2012_IDs {unknown[:5]} are not leaf synsets in {meta}")
        return [ids[int(ln)] for ln in lines]
    else:
        by_name = {}
        for i, ln in enumerate(lines):
            parts = re.split(r"[\s,]+", ln)
            if len(parts) < 2:
                raise DataError(f"{path}, line {i + 1}: expected 'file label', got {ln[:60]!r}")
            by_name[parts[0]] = parts[1]
    out, missing = [], []
    for n in names:
        label = by_name.get(n, by_name.get(os.path.splitext(n)[0]))
        if label is None:
            missing.append(n)
        out.append(label)
    if missing:
        raise DataError(f"{path}: no label for {len(missing)} image(s), e.g. {', '.join(missing[:3])}")
    extra = len(set(by_name) - set(names) - set(stems))
    if extra:
        raise DataError(f"{path}: {extra} label(s) name images that are not in the folder")
    return out


def label_indices(labels: Sequence[str], class_names: Sequence[str] | None, where: str
                  ) -> tuple[list[int], list[str]]:
    """Label texts -> class indices and the class names: indices stay indices, names are looked up in
    ``class_names`` (default: the sorted distinct names)."""
    if all(re.fullmatch(r"\d+", lb) for lb in labels):
        idx = [int(lb) for lb in labels]
        names = list(class_names) if class_names is not None else [str(i) for i in range(max(idx) + 1)]
        if max(idx) >= len(names):
            raise DataError(f"{where}: label {max(idx)} but only {len(names)} classes")
        return idx, names
    names = list(class_names) if class_names is not None else sorted(set(labels))
    pos = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(pos))
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not among the {len(names)} class names")
    return [pos[lb] for lb in labels], names


def flat_folder_files(src: str | os.PathLike, labels_file: str, *, class_names: Sequence[str] | None = None,
                      shuffle_seed: int | None = None) -> tuple[list[tuple[str, str, int]], list[str]]:
    """``(path, key, label)`` for the images directly in ``src`` (sorted by name; shuffled only with
    ``shuffle_seed``) with labels from ``labels_file``, and the class names."""
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a directory")
    names = sorted(e.name for e in os.scandir(src) if e.is_file() and _is_image_name(e.name))
    if not names:
        raise DataError(f"{src}: no images ({'/'.join(FOLDER_EXTENSIONS)}) directly in it (a flat folder, as "
                        "ImageNet's val/; an ImageFolder tree needs no --labels)")
    labels, classes = label_indices(read_labels_file(labels_file, names), class_names, labels_file)
    files = [(os.path.join(src, n), _key(src, os.path.join(src, n)), lb) for n, lb in zip(names, labels, strict=True)]
    return _shuffled(files, shuffle_seed), classes


# ------------------------------------------------------------------ writing
def _estimated_bytes(item: tuple[str, str, int]) -> int:
    path, key, label = item
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return tar_bytes(f"{key}.{ext}", os.path.getsize(path)) + tar_bytes(f"{key}.cls", len(str(label)))


def write_files(files: Sequence[tuple[str, str, int]], out: str | os.PathLike, *, class_names: Sequence[str],
                samples_per_shard: int = 1000, max_bytes: int | None = None, overwrite: bool = False,
                workers: int = 1) -> Manifest:
    """Shards + manifest from ``(path, key, label)`` files: planned from the file sizes, written by ``workers``
    processes (same bytes for any count)."""
    keys: set[str] = set()
    for _, key, _ in files:
        if key in keys:
            raise DataError(f"two files give the sample key {key!r} (dots in names become '_'): rename one")
        keys.add(key)
    plan = plan_shards([_estimated_bytes(f) for f in files], samples_per_shard=samples_per_shard,
                       max_bytes=max_bytes)
    return write_planned_shards([[files[i] for i in r] for r in plan], load_image_file, out,
                                class_names=class_names, overwrite=overwrite, workers=workers)


def write_image_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    workers: int = 1,
    labels: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Manifest:
    """Shards + manifest from an ImageFolder tree (class index = sorted class-directory order, or the position
    in ``class_names``), or with ``labels`` from a flat folder + labels file (see the module docstring)."""
    if labels is not None:
        files, classes = flat_folder_files(src, labels, class_names=class_names, shuffle_seed=shuffle_seed)
    else:
        files = image_folder_files(src, shuffle_seed=shuffle_seed)
        classes = image_folder_classes(src)
        if class_names is not None:
            if sorted(class_names) != sorted(classes):
                raise DataError(f"{src}: its class folders are not the {len(class_names)} class names given")
            pos = {n: i for i, n in enumerate(class_names)}
            files = [(p, k, pos[classes[lb]]) for p, k, lb in files]
            classes = list(class_names)
    return write_files(files, out, class_names=classes, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                       overwrite=overwrite, workers=workers)


__all__ = [
    "devkit_synsets",
    "flat_folder_files",
    "image_folder_classes",
    "image_folder_files",
    "image_folder_samples",
    "load_image_file",
    "read_labels_file",
    "write_files",
    "write_image_folder",
]
