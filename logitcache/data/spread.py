"""Spread the views of one decoded image over different batches (``--views-per-decode N``, issue 17).

A DataLoader batches each worker's own stream: positions [0, B), [B, 2B), ... of that worker's items. The views
of an image must land in different batches, so the stage places them by position:

    images in windows (`window_plan`: >= ceil((N+3)·B/N) images and >= the shuffle buffer's views each)
      ─► in a window: images in random order, each image's views consecutive (in random order)
      ─► cells = the window's stream positions in column-major order over the batch grid
             (column = p mod B, row = batch p div B; full rows in a random order, the same in every column;
              a partial first row first, a partial last row last)
      ─► the k-th view goes to the k-th cell; the window's views leave in position order

An image's views take consecutive cells of the column-major order, so they lie in distinct batches whenever each
column of the window spans at least N+2 batches (every window of `window_plan` does), or — a single window that
starts a worker's stream — exactly when the worker holds at least B images (`spread_possible`). Every window is
checked as it is placed; a violation (only when decode failures shrink the last window) warns, once.

Memory: one window's views per worker, about max((N+3)·B, shuffle_buffer) views. A stream of unknown length (the
webdataset stage) uses `spread_stream`: windows of w = ceil((N+3)·B/N) images, the last one of w .. 2w-1.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class SpreadWarning(UserWarning):
    """Some image's views share a batch (decode failures left too few images in a worker's last window)."""


def window_plan(num_images: int, views_per_decode: int, batch_size: int, min_views: int = 0) -> list[int]:
    """Images per window for a worker that holds ``num_images``: ``q = max(1, num_images // w)`` windows of
    ``num_images / q`` (rounded), ``w = max(ceil((N+3)·B/N), ceil(min_views/N))``."""
    w = window_images(views_per_decode, batch_size, min_views)
    q = max(1, num_images // w)
    return [(j + 1) * num_images // q - j * num_images // q for j in range(q)]


def window_images(views_per_decode: int, batch_size: int, min_views: int = 0) -> int:
    """The images a window needs: ``max(ceil((N+3)·B/N), ceil(min_views/N), 1)``."""
    n = views_per_decode
    return max(math.ceil((n + 3) * batch_size / n), math.ceil(min_views / n), 1)


def spread_possible(num_images: int, batch_size: int) -> bool:
    """Whether a worker holding ``num_images`` images (no decode failures) gets each image's views into
    different batches: with none, trivially; else exactly when it holds at least one batch of images (for N >= 2
    views each, fewer than B images give fewer than N batches that could hold them all)."""
    return num_images == 0 or num_images >= batch_size


def cell_order(start: int, total: int, batch_size: int, rng: random.Random | None) -> list[int]:
    """Stream positions ``start .. start+total-1`` in column-major order over the batch grid; full batches in a
    random order (``rng`` None: in order), the same in every column; a partial first/last batch first/last."""
    if total == 0:
        return []
    first, last = start // batch_size, (start + total - 1) // batch_size
    full = [r for r in range(first, last + 1)
            if r * batch_size >= start and (r + 1) * batch_size <= start + total]
    if rng is not None:
        rng.shuffle(full)
    rank = {r: i for i, r in enumerate(full)}
    top, bottom = -1, len(full)

    def key(p: int) -> tuple[int, int]:
        r = p // batch_size
        return p % batch_size, rank.get(r, top if r == first else bottom)

    return sorted(range(start, start + total), key=key)


def place_window(groups: Sequence[Sequence[Any]], start: int, batch_size: int,
                 rng: random.Random | None) -> tuple[list[Any], bool]:
    """The views of ``groups`` (one sequence per image) in stream order for positions from ``start``; and
    whether every image's views lie in distinct batches."""
    order = list(range(len(groups)))
    if rng is not None:
        rng.shuffle(order)
    flat: list[Any] = []
    owner: list[int] = []
    for g in order:
        views = list(groups[g])
        if rng is not None:
            rng.shuffle(views)
        flat.extend(views)
        owner.extend([g] * len(views))
    cells = cell_order(start, len(flat), batch_size, rng)
    out: list[Any] = [None] * len(flat)
    seen: set[tuple[int, int]] = set()
    ok = True
    for item, g, p in zip(flat, owner, cells, strict=True):
        out[p - start] = item
        key = (g, p // batch_size)
        ok = ok and key not in seen
        seen.add(key)
    return out, ok


class _WindowPlacer:
    """Places successive windows of a stream (`place_window`), counting the stream's position, and warns once
    when a window cannot keep an image's views in different batches."""

    def __init__(self, batch_size: int, rng: random.Random | None, where: str, which: str, cause: str):
        self.batch_size, self.rng, self.where, self.which, self.cause = batch_size, rng, where, which, cause
        self.pos, self.warned = 0, False

    def place(self, window: list[Sequence[Any]]) -> list[Any]:
        out, ok = place_window(window, self.pos, self.batch_size, self.rng)
        if not ok and not self.warned:
            self.warned = True
            warnings.warn(f"{self.where}: {len(window)} image(s) {self.which} cannot put their views into different "
                          f"batches of {self.batch_size} ({self.cause}); some batches hold two views of one image",
                          SpreadWarning, stacklevel=3)
        self.pos += len(out)
        return out


def spread_views(groups: Iterable[Sequence[Any]], plan: Sequence[int], batch_size: int,
                 rng: random.Random | None, where: str = "") -> Iterator[Any]:
    """Stage: the views of each group (image) spread over distinct batches of this stream; windows of
    ``plan[j]`` non-empty groups (the last window takes all that remain)."""
    it = (g for g in groups if len(g))
    placer = _WindowPlacer(batch_size, rng, where, "left in the last window", "samples failed to decode")
    plan = list(plan) or [0]
    for j, size in enumerate(plan):
        window: list[Sequence[Any]] = []
        for g in it:
            window.append(g)
            if j < len(plan) - 1 and len(window) == size:
                break
        yield from placer.place(window)


def spread_stream(groups: Iterable[Sequence[Any]], views_per_decode: int, batch_size: int,
                  rng: random.Random | None, where: str = "") -> Iterator[Any]:
    """`spread_views` for a stream whose length is not known in advance: windows of ``w`` images (`window_plan`'s
    w), except the last, which takes the w .. 2w-1 that remain (all of them when the stream holds fewer than 2w).
    Holds at most 2w images' views."""
    w = window_images(views_per_decode, batch_size)
    placer = _WindowPlacer(batch_size, rng, where, "in a window", "fewer than one batch of images in this stream")
    buf: list[Sequence[Any]] = []
    for g in groups:
        if len(g):
            buf.append(g)
        if len(buf) == 2 * w:
            yield from placer.place(buf[:w])
            buf = buf[w:]
    if buf:
        yield from placer.place(buf)
