"""`view_rng`: the per-view random stream, a pure function of ``(seed, epoch, global index)`` — no global RNG,
so a view does not depend on worker count, rank count or reading order."""

from __future__ import annotations

import operator

import numpy as np

# A domain tag mixed into every view seed, so a (seed, epoch, index) used elsewhere never shares this stream.
VIEW_RNG_TAG = 0x76696577  # "view"


# ------------------------------------------------------------------ sampling (pure, no global RNG)
def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A numpy Generator seeded purely from ``(seed, epoch, global index)`` (SeedSequence hashing, PCG64)."""
    words = []
    for what, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        v = operator.index(v)
        if v < 0:
            raise ValueError(f"view_rng: {what} must be >= 0, got {v}")
        words.append(v)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([VIEW_RNG_TAG, *words])))


