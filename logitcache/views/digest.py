"""Replay digests: proof that this machine turns a cache's params into the pixels the teacher saw.

The dump records, in each unit's marker, the sha256 of the uint8 pixels of the unit's first `DIGEST_VIEWS`
finished views (offset order, after mixing) and the versions of the libraries that made them. `CachedViews`,
``train`` and ``verify --data`` recompute the digest of a sample of units before trusting the cache, and refuse
(`ReplayMismatchError`) naming the versions recorded and found: a changed Pillow resampler, libjpeg-turbo, or
torchvision decoder would otherwise silently train the student on pixels the teacher never saw. Costs no
bytes per view (one short JSON entry per unit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import features

from logitcache.data.decode import DECODER
from logitcache.errors import ReplayMismatchError
from logitcache.views.mixing import UnitMixer
from logitcache.views.recipe import Recipe

#: finished views per unit whose pixels the marker's digest covers
DIGEST_VIEWS = 4


def library_versions() -> dict[str, str]:
    """The versions of everything between the stored bytes and the pixels: decoder, resampler, augment ops."""
    out = {"pillow": PIL.__version__, "torchvision": torchvision.__version__, "torch": torch.__version__,
           "numpy": np.__version__, "decoder": str(DECODER)}
    try:
        out["pillow_libjpeg_turbo"] = str(features.version("libjpeg_turbo"))
    except Exception:  # noqa: BLE001 - a Pillow without that feature query
        out["pillow_libjpeg_turbo"] = "unknown"
    return out


class DigestBuilder:
    """Feeds on a unit's finished views in offset order; `record()` is the marker entry."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.offsets: list[int] = []

    def add(self, offset: int, image) -> None:
        if len(self.offsets) < DIGEST_VIEWS:
            self.offsets.append(int(offset))
            self._h.update(np.ascontiguousarray(image.numpy()).tobytes())

    def record(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "sha256": self._h.hexdigest(), "versions": library_versions()}


def recompute(samples: Iterable, recipe: Recipe, record: dict[str, Any], *, seed: int, epoch: int, shard: int,
              stored: np.ndarray) -> str:
    """The digest of the recorded offsets' views, replayed from ``stored`` params over ``samples`` (the unit's
    shard, in order; reading stops after the last block needed)."""
    wanted = list(record["offsets"])
    if not wanted:
        return hashlib.sha256().hexdigest()
    last_block = max(wanted) // recipe.mix_block if recipe.mixes else max(wanted)
    mixer = UnitMixer(recipe, seed=seed, epoch=epoch, shard=shard, stored=stored)
    got: dict[int, bytes] = {}
    for sample in samples:
        if (sample.offset // recipe.mix_block if recipe.mixes else sample.offset) > last_block:
            break
        if sample.offset in wanted or recipe.mixes:
            for v in mixer.push(sample):
                got[v.sample.offset] = np.ascontiguousarray(v.image.numpy()).tobytes()
    for v in mixer.finish():
        got[v.sample.offset] = np.ascontiguousarray(v.image.numpy()).tobytes()
    h = hashlib.sha256()
    for o in wanted:
        h.update(got.get(o, b"<missing>"))
    return h.hexdigest()


def check(record: dict[str, Any] | None, found: str, where: str) -> None:
    """Refuse when a recomputed digest differs from the recorded one, naming the library versions."""
    if record is None or found == record["sha256"]:
        return
    now = library_versions()
    was = record.get("versions", {})
    changed = [f"{k}: {was.get(k, '?')} when cached, {now.get(k, '?')} here" for k in sorted(set(was) | set(now))
               if was.get(k) != now.get(k)]
    raise ReplayMismatchError(
        f"{where}: the views replayed here are not the pixels the teacher saw (digest of offsets "
        f"{record['offsets']} differs). Library versions that differ: "
        + ("; ".join(changed) if changed else f"none ({', '.join(f'{k} {v}' for k, v in sorted(now.items()))}); "
           "the decoder or resampler changed without a version change, or the CPU computes them differently")
        + ". Replay with the versions the cache was made with, or dump again here."
    )
