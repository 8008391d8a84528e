"""PS-KD's memory: every sample's prediction from the previous epoch, kept in a zarr store in the cache format.

PS-KD (Kim et al., ICCV 2021) trains epoch e against ``(1 − α_t)·y + α_t·p_{e−1}``, where ``p_{e−1}`` is the
model's own softmax on that sample in epoch e − 1. The released code keeps a dense N × C tensor in memory;
at ImageNet scale that is 1.28 M × 1000 floats (5 GB) per process. Here the predictions live in
``RUN/pskd.zarr``, group ``pskd``, written through `CacheWriter` in the teacher-cache schema (`schema.py`):

    unit (slot, shard), slot = epoch mod 2     two slots used alternately: epoch e reads slot (e−1) mod 2 while
                                               it writes slot e mod 2
    rows                                       `TopKLogits.from_logits(student logits, target, k, (1,))` of the
                                               view trained on (k = ``pskd_topk``; k = C, the default, is the
                                               dense softmax, so the reference is reproduced exactly; fp32)
    view_params                                the params of that view
    marker stats                               {"train_epoch": e, "views": n}; a reader checks train_epoch

A unit is written as soon as all rows of its shard have been seen this epoch, and every unit still open is
written at the epoch's end (with its missing rows — samples skipped as corrupt — listed as skipped). Rows
awaiting their unit travel in mid-epoch checkpoints (`state_dict`), so a resumed run writes the same units.
Ranks own whole shards, so they never write the same unit; rank 0 creates the store.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader, UnitTable
from logitcache.cache.schema import UnitRows
from logitcache.cache.writer import CacheWriter
from logitcache.data.manifest import Manifest
from logitcache.errors import CacheError
from logitcache.labels.topk import TopKLogits
from logitcache.replay import RowSource
from logitcache.runtime.dist import SINGLE_PROCESS, DistEnv
from logitcache.runtime.precision import default_teacher_precision
from logitcache.views.recipe import Recipe

GROUP = "pskd"  # the one teacher group of RUN/pskd.zarr
SLOTS = 2
STORE_NAME = "pskd.zarr"


def slot(epoch: int) -> int:
    """The unit epoch (slot) training epoch ``epoch`` writes its predictions to."""
    return epoch % SLOTS


class PredictionStore:
    """Per-sample predictions of the previous epoch for PS-KD. Create with `PredictionStore.create`."""

    def __init__(self, url: str, manifest: Manifest, k: int, writer: CacheWriter):
        self.url, self.manifest, self.k, self.writer = url, manifest, k, writer
        self._first = np.array([s.first_index for s in manifest.shards], dtype=np.int64)
        self._pending: dict[int, list[tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]]] = defaultdict(list)
        self._pending_epoch: int | None = None

    @classmethod
    def create(
        cls,
        url: str,
        manifest: Manifest,
        *,
        k: int,
        recipe: Recipe,
        seed: int,
        student: str,
        normalization: dict[str, list[float]],
        env: DistEnv = SINGLE_PROCESS,
        fresh: bool = True,
    ) -> PredictionStore:
        """Make (``fresh``: remove any old one first) or reopen the store; every rank calls this."""
        if not 1 <= k <= manifest.num_classes:
            raise ValueError(f"pskd_topk must be in [1, {manifest.num_classes}], got {k}")
        meta = schema.GroupMeta(
            teacher=f"self:{student}", weights=None, weights_digest="", num_classes=manifest.num_classes,
            normalization=normalization, recipe=recipe.to_json(), param_fields=tuple(recipe.param_fields), k=k,
            temperatures=(1.0,), seed=seed, epochs=SLOTS, value_dtype="float32",
            index_dtype=schema.index_dtype(manifest.num_classes),
            teacher_precision=default_teacher_precision(env.device),  # the student's forward (`precision.autocast`)
        )
        root = schema.RootMeta(manifest.fingerprint, manifest.num_classes, len(manifest.shards),
                               tuple(s.num_samples for s in manifest.shards),
                               format_version=schema.FORMAT_1)  # float32 values, k = C: the exact reference
        if env.is_main:
            if fresh and os.path.exists(url):
                shutil.rmtree(url)  # predictions of an earlier, abandoned run in this directory
            writer = CacheWriter.create_or_open(url, GROUP, meta, root, manifest.to_json())
        env.barrier()
        if not env.is_main:
            writer = CacheWriter.open(url, GROUP)
        return cls(url, manifest, k, writer)

    # ---------------------------------------------------------------- reading (inside the data stage)
    def source(self, epoch: int) -> RowSource | None:
        """The rows training epoch ``epoch`` learns from: epoch − 1's predictions (None in epoch 0)."""
        if epoch == 0:
            return None
        return PreviousPredictions(CacheReader(self.url, GROUP), slot(epoch - 1), epoch - 1)

    # ---------------------------------------------------------------- writing (the training loop)
    def record(self, epoch: int, index: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
               view: torch.Tensor) -> None:
        """Keep this batch's predictions (``logits`` (N, C), detached); write each shard whose rows are all in."""
        if self._pending_epoch not in (None, epoch):
            raise RuntimeError(f"pskd store: epoch {self._pending_epoch} was not finished before epoch {epoch}")
        self._pending_epoch = epoch
        gi = index.cpu().numpy().astype(np.int64)
        shards = np.searchsorted(self._first, gi, side="right") - 1
        logits, target, view = logits.detach().float().cpu(), target.cpu(), view.cpu().numpy()
        for s in np.unique(shards):
            sel = np.nonzero(shards == s)[0]
            sel_t = torch.from_numpy(sel)
            self._pending[int(s)].append((gi[sel] - self._first[s], logits[sel_t], target[sel_t], view[sel]))
            if sum(len(p[0]) for p in self._pending[int(s)]) == self.manifest.shards[int(s)].num_samples:
                self._write(epoch, int(s))

    def finish_epoch(self, epoch: int) -> None:
        """Write the units still open (shards with skipped samples); call on every rank at the epoch's end."""
        for s in sorted(self._pending):
            self._write(epoch, s)
        self._pending_epoch = None

    def _write(self, epoch: int, shard: int) -> None:
        parts = self._pending.pop(shard)
        offsets = np.concatenate([p[0] for p in parts])
        order = np.argsort(offsets, kind="stable")
        offsets = offsets[order]
        if len(np.unique(offsets)) != len(offsets):
            raise RuntimeError(f"pskd store: shard {shard} saw a sample twice in epoch {epoch}")
        perm = torch.from_numpy(order)
        logits = torch.cat([p[1] for p in parts])[perm]
        target = torch.cat([p[2] for p in parts])[perm]
        view = np.concatenate([p[3] for p in parts])[order]
        tk = TopKLogits.from_logits(logits, target, self.k, (1.0,))
        rows = UnitRows.from_topk(tk, view, "float32")
        length = self.manifest.shards[shard].num_samples
        skipped = tuple(sorted(set(range(length)) - set(offsets.tolist())))
        self.writer.write_unit(slot(epoch), shard, offsets, rows, length,
                               {"train_epoch": float(epoch), "views": float(len(offsets))}, skipped)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Rows awaiting their unit, as tensors (weights_only-loadable)."""
        out: dict[str, torch.Tensor | int] = {"epoch": -1 if self._pending_epoch is None else self._pending_epoch}
        for s, parts in self._pending.items():
            out[f"{s}/offsets"] = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            out[f"{s}/logits"] = torch.cat([p[1] for p in parts])
            out[f"{s}/target"] = torch.cat([p[2] for p in parts])
            out[f"{s}/view"] = torch.from_numpy(np.concatenate([p[3] for p in parts]))
        return out

    def load_state_dict(self, state: dict) -> None:
        self._pending.clear()
        epoch = int(state.get("epoch", -1))
        self._pending_epoch = None if epoch < 0 else epoch
        for key in state:
            if key.endswith("/offsets"):
                s = key.split("/")[0]
                self._pending[int(s)].append((state[f"{s}/offsets"].numpy(), state[f"{s}/logits"],
                                              state[f"{s}/target"], state[f"{s}/view"].numpy()))


class PreviousPredictions(RowSource):
    """The rows of slot ``slot(train_epoch)``, refusing a unit that holds another epoch's predictions (an earlier
    run, or an interrupted epoch)."""

    def __init__(self, reader: CacheReader, unit_epoch: int, train_epoch: int):
        super().__init__(reader, unit_epoch)
        self.train_epoch = train_epoch

    def table(self, shard: int) -> UnitTable:
        self.reader.markers(refresh=True)  # the slots are rewritten every other epoch: never trust old markers
        t = super().table(shard)
        got = t.marker.stats.get("train_epoch")
        if got is None or not math.isclose(got, self.train_epoch):
            raise CacheError(f"{t.where} holds train_epoch={got}, expected {self.train_epoch}: it is stale (an "
                             f"earlier run or an interrupted epoch); start the run again")
        return t
