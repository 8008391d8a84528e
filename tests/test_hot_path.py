"""Issue 14 items 3 and 4: a training step without host–device syncs, and costs that stay flat.

- `TopKLogits.pin_memory` is what a DataLoader with ``pin_memory=True`` calls on the rows (checked without a GPU
  by standing in for the accelerator and for ``Tensor.pin_memory``; for real where CUDA exists);
- the lockstep plan (every rank's batch sizes, from the manifest) is what the DataLoader yields, so the ranks
  need no per-step agreement;
- `SyncCounter` counts 0 syncs per step for CE and cached NKD (and does count a sync when there is one);
- the dump's batches (hence its bytes) are those of decoding the shard once per epoch, skipped samples included.
"""

import random

import numpy as np
import pytest
import torch
from _data_helpers import imagenet_like_samples

from logitcache.data.manifest import load_manifest
from logitcache.data.shards import iter_shard
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, UnitViews, _collate, dump
from logitcache.labels.topk import TopKLogits
from logitcache.replay import FreshViews, collate
from logitcache.train import syncs
from logitcache.train.config import TrainConfig
from logitcache.train.lockstep import loader_batch_sizes, plan_epoch
from logitcache.train.loop import train
from logitcache.views.recipe import apply_view, get_recipe, sample_view
from logitcache.views.rng import view_rng

SEED = 3


# ------------------------------------------------------------------ pinned rows
def _rows(n: int, seed: int = 0) -> TopKLogits:
    g = torch.Generator().manual_seed(seed)
    return TopKLogits.from_logits(torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g), 3,
                                  (1.0, 4.0))


def test_a_dataloader_with_pin_memory_pins_the_topk_rows(monkeypatch):
    """DataLoader(pin_memory=True) calls `TopKLogits.pin_memory` on every batch, which pins each of its tensors.
    Without a GPU the accelerator and ``Tensor.pin_memory`` are stood in for: the fake records what it pinned."""
    pinned: set[int] = set()

    def fake_pin(self, *args, **kwargs):
        out = self.clone()
        pinned.add(out.data_ptr())
        return out

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    rows = _rows(6)
    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), rows[i], int(rows.target[i])) for i in range(6)]
    loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collate, pin_memory=True)
    images, soft, target = next(iter(loader))
    assert isinstance(soft, TopKLogits) and len(soft) == 4
    assert {t.data_ptr() for t in soft._tensors()} <= pinned  # every tensor of the rows went through pin_memory
    assert images.data_ptr() in pinned and target.data_ptr() in pinned
    assert torch.equal(soft.logits, rows.logits[:4]) and soft.temperatures == rows.temperatures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real pinned memory needs CUDA (the test above stands in)")
def test_topk_rows_pin_and_copy_without_blocking_on_cuda():
    rows = _rows(4).pin_memory()
    assert rows.is_pinned()
    on_gpu = rows.to("cuda", non_blocking=True)
    assert torch.equal(on_gpu.cpu().logits, rows.logits)


# ------------------------------------------------------------------ the lockstep plan
class _Counted(torch.utils.data.IterableDataset):
    """Worker w yields counts[w] items, sleeping a little at random so the workers race."""

    def __init__(self, counts):
        self.counts = counts

    def __iter__(self):
        import time

        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        rng = random.Random(w)
        for i in range(self.counts[w]):
            time.sleep(rng.random() * 0.002)
            yield w, i


@pytest.mark.parametrize("counts,batch,workers", [([7], 3, 0), ([9, 2, 0], 4, 3), ([5, 13], 2, 2), ([1, 4, 4], 1, 3)])
def test_loader_batch_sizes_are_what_the_dataloader_yields(counts, batch, workers):
    loader = torch.utils.data.DataLoader(_Counted(counts), batch_size=batch, num_workers=workers,
                                         collate_fn=lambda b: b)
    assert [len(b) for b in loader] == loader_batch_sizes(counts, batch)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_epoch_plan_is_every_ranks_batches(imagenet_shards, workers):
    """3 shards of 8 on 2 ranks: each rank's DataLoader yields exactly the batch sizes of the plan, which the
    ranks then need not agree on step by step."""
    manifest = load_manifest(imagenet_shards)
    recipe = get_recipe("imagenet", 32)
    plan = plan_epoch(manifest, [0, 1, 2], SEED, 1, 2, 3, workers)
    for rank in range(2):
        views = FreshViews(manifest, seed=SEED, epoch=1, recipe=recipe, rank=rank, world_size=2, shuffle_seed=SEED)
        loader = torch.utils.data.DataLoader(views, batch_size=3, num_workers=workers, collate_fn=collate)
        assert [len(b[-1]) for b in loader] == list(plan.sizes[rank])
    assert sum(plan.total(i) for i in range(plan.steps)) == 24
    skipped = plan_epoch(manifest, [0, 1, 2], SEED, 1, 2, 3, workers, skipped={0: 2, 2: 1})
    assert sum(skipped.total(i) for i in range(skipped.steps)) == 21


# ------------------------------------------------------------------ syncs per step
def test_the_sync_counter_sees_syncs_in_the_step_and_not_elsewhere():
    x = torch.randn(4, 3)
    with syncs.SyncCounter() as counter:
        syncs.mark("step")
        y = (x * 2).sum()  # no sync
        float(y)  # one (counted once although __float__ calls item)
        torch.nonzero(x > 0)  # a data-dependent size: one
        x.to("cpu")  # a blocking copy: one
        x.to("cpu", non_blocking=True)  # none
        syncs.mark("data")
        y.item()  # not counted: the loader's time
        syncs.mark("display")
        y.item()
        syncs.mark(None)
    assert counter.counts == {"Tensor.__float__": 1, "torch.nonzero": 1, "Tensor.to": 1}
    assert counter.other == {"display:Tensor.item": 1} and counter.steps == 1
    y.item()  # patches are gone
    assert counter.total == 3


@pytest.fixture(scope="module")
def small_cache(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("hot_path_cache") / "cache.zarr"
    dump(DumpConfig(data=str(small_shards), out=str(out), teacher="smallcnn", recipe="small", epochs=1, topk=5,
                    seed=SEED, batch_size=8, progress=False))
    return out


@pytest.mark.parametrize("mode", ["ce", "nkd-cached"])
def test_no_host_device_sync_per_step_for_ce_and_cached_nkd(small_shards, small_cache, tmp_path, mode):
    """The real loop, a test-sized run: 0 syncs in the step (the hot path); the display and checkpoints every
    N steps do sync, and the counter sees them (so it is live)."""
    kw = dict(loss="ce", recipe="small") if mode == "ce" else dict(loss="nkd", cache=str(small_cache))
    cfg = TrainConfig(data=str(small_shards), out=str(tmp_path / "run"), student="smallcnn", epochs=1, batch_size=5,
                      lr=0.05, seed=SEED, progress=False, checkpoint_every=2, **kw)
    with syncs.SyncCounter() as counter:
        line = train(cfg)
    assert line["train"]["samples"] == 24
    assert counter.steps == 6  # 2 shards of 12 samples: 2 streams (--streams), each in batches of 5, 5, 2
    assert counter.total == 0, counter.counts
    assert counter.other, "the display/checkpoint syncs every N steps should have been seen"


# ------------------------------------------------------------------ the dump's batches
def _batches_decoding_per_epoch(manifest, pending, recipe, seed, batch_size):
    """The batches of the former dump, which kept one buffer per pending epoch: batch j of epoch e is the j-th run
    of ``batch_size`` samples that decode; then a (possibly empty) last batch per epoch ends the unit."""
    out = []
    for shard in sorted(pending):
        samples = list(iter_shard(manifest, shard, skip_bad=True))
        per_epoch = {e: [] for e in pending[shard]}
        for sample in samples:
            _, h, w = sample.image.shape
            for e in pending[shard]:
                params = sample_view(view_rng(seed, e, sample.index), h, w, recipe)
                per_epoch[e].append((sample.offset, apply_view(sample.image, params, recipe), sample.label,
                                     params.to_array(), f"{sample.url}:{sample.key}"))
        n_full = len(samples) // batch_size
        for j in range(n_full):
            for e in pending[shard]:
                out.append((_collate(e, shard, per_epoch[e][j * batch_size:(j + 1) * batch_size]), False))
        for e in pending[shard]:
            out.append((_collate(e, shard, per_epoch[e][n_full * batch_size:], recipe), True))
    return out


def test_dump_batches_do_not_depend_on_the_number_of_epochs_held(tmp_path):
    """Decoding a chunk and emitting its batch for each epoch in turn gives the very batches (offsets, pixels,
    view params, unit ends, skipped samples) of one buffer per epoch, so the cache's bytes are unchanged."""
    samples = list(imagenet_like_samples(19, num_classes=10))
    samples[4] = (samples[4][0], {"jpg": b"not a jpeg", "cls": b"3"})
    samples[12] = (samples[12][0], {"jpg": b"\xff\xd8broken", "cls": b"1"})
    write_shards(iter(samples), tmp_path / "data", class_names=[str(i) for i in range(10)], samples_per_shard=8)
    manifest = load_manifest(tmp_path / "data")
    recipe = get_recipe("imagenet", 24)
    pending = {0: [0, 1, 2], 1: [1, 2], 2: [0, 1, 2]}
    new = list(UnitViews(manifest, pending, recipe, SEED, 3, skip_bad=True))
    old = _batches_decoding_per_epoch(manifest, pending, recipe, SEED, 3)
    assert len(new) == len(old)
    for got, (want, end) in zip(new, old, strict=True):
        assert (got.epoch, got.shard, got.end_of_unit) == (want.epoch, want.shard, end)
        assert torch.equal(got.offsets, want.offsets) and torch.equal(got.images, want.images)
        assert torch.equal(got.view_params, want.view_params) and got.sample_ids == want.sample_ids
    ends = [b for b in new if b.end_of_unit]
    assert [b.skipped for b in ends if b.shard == 0] == [(4,)] * 3
    assert [b.skipped for b in ends if b.shard == 1] == [(4,)] * 2
    assert np.array_equal(np.unique([len(b.offsets) for b in new if not b.end_of_unit]), [3])


# ------------------------------------------------------------------ reads that stay flat
def _count_object_reads(monkeypatch, log_path):
    """Log every ObjectStore read (key, pid) to a file: DataLoader workers are forked after the patch, so their
    reads land in the same file."""
    import os

    from logitcache.cache.store import ObjectStore

    def log(keys):
        with open(log_path, "a") as f:
            for k in keys:
                f.write(f"{os.getpid()} {k}\n")

    get, get_many, listing = ObjectStore.get, ObjectStore.get_many, ObjectStore.list

    def counted_get(self, key, **kwargs):
        log([key])
        return get(self, key, **kwargs)

    def counted_get_many(self, keys, **kwargs):
        log(keys)
        return get_many(self, keys, **kwargs)

    def counted_list(self, prefix):
        log([f"LIST {prefix}"])
        return listing(self, prefix)

    monkeypatch.setattr(ObjectStore, "get", counted_get)
    monkeypatch.setattr(ObjectStore, "get_many", counted_get_many)
    monkeypatch.setattr(ObjectStore, "list", counted_list)

    def reads():
        if not log_path.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in log_path.read_text().splitlines()]

    return reads


@pytest.mark.parametrize("index", [True, False])
def test_markers_are_read_once_by_the_reader_and_handed_to_its_workers(small_shards, tmp_path, monkeypatch, index):
    """Two training epochs over a 2-epoch cache with 2 DataLoader workers: the parent reads each cached epoch's
    markers once (one unit index object, or the epoch's markers when there is no index) and the workers read
    no marker, no index and no metadata object at all."""
    import os

    from _cache_edit import unseal

    from logitcache.cache import schema
    from logitcache.cache.reader import CacheReader
    from logitcache.replay import CachedViews

    cache = tmp_path / "cache.zarr"
    dump(DumpConfig(data=str(small_shards), out=str(cache), teacher="smallcnn", recipe="small", epochs=2, topk=3,
                    seed=SEED, batch_size=8, progress=False))
    group = CacheReader(str(cache)).group
    # format 2: sealed, one pack index per epoch is the record of its units
    assert [n[:7] for n in sorted(os.listdir(cache / group / schema.UNIT_INDEX_DIR))] == ["e00000-", "e00001-"]
    assert not (cache / group / schema.UNITS_DIR).exists()
    if not index:
        unseal(cache, group)  # a cache with markers and no index (format 1, or dumped before sealing)
    reads = _count_object_reads(monkeypatch, tmp_path / "reads.log")
    reader = CacheReader(str(cache))
    n = 0
    for epoch in range(2):
        views = CachedViews(small_shards, reader, epoch=epoch, shuffle_seed=SEED)
        for batch in torch.utils.data.DataLoader(views, batch_size=5, num_workers=2, collate_fn=collate):
            n += len(batch[-1])
    assert n == 48
    got = reads()
    parent = str(os.getpid())
    worker_reads = [k for pid, k in got if pid != parent]  # (the reader's integrity check reads chunks there)
    assert [k for k in worker_reads if k.endswith(".json") or k.startswith("LIST")] == []  # no marker, no metadata
    marker_reads = [k for _, k in got if f"/{schema.UNITS_DIR}/" in k]
    index_reads = [k for _, k in got if f"/{schema.UNIT_INDEX_DIR}" in k]  # its listings too
    # per cached epoch, once: a listing of the indexes and a GET of the epoch's one (none when unsealed)
    assert len([k for k in index_reads if k.startswith("LIST")]) == 2
    assert len([k for k in index_reads if not k.startswith("LIST")]) == (2 if index else 0)
    assert len(marker_reads) == (0 if index else 2 * 2)  # without an index: the epoch's 2 markers, once


def test_pskd_reads_one_marker_per_shard_and_epoch(imagenet_shards, tmp_path, monkeypatch):
    """PS-KD's data stage reads the marker of each unit it uses (one GET per shard and epoch, O(shards)), never
    a listing of all markers per shard (O(shards²))."""
    from logitcache.cache import schema

    reads = _count_object_reads(monkeypatch, tmp_path / "reads.log")
    cfg = TrainConfig(data=str(imagenet_shards), out=str(tmp_path / "run"), student="smallcnn", loss="pskd",
                      recipe="imagenet", image_size=32, epochs=3, batch_size=4, lr=0.05, seed=SEED, progress=False)
    train(cfg)
    got = [k for _, k in reads()]
    marker_reads = [k for k in got if f"pskd/{schema.UNITS_DIR}/" in k and not k.startswith("LIST")]
    assert len(marker_reads) == 2 * 3  # epochs 1 and 2 each read the 3 units of the previous epoch
    assert not [k for k in got if k.startswith("LIST") and schema.UNITS_DIR in k]


def test_pskd_store_errors_reach_the_training_thread(imagenet_shards, tmp_path):
    """The store writes on a background thread: a failing write is raised in the training thread (by the next
    record, state_dict or finish_epoch), never lost."""
    from logitcache.train.pskd_store import PredictionStore

    manifest = load_manifest(imagenet_shards)
    store = PredictionStore.create(str(tmp_path / "pskd.zarr"), manifest, k=5, recipe=get_recipe("imagenet", 32),
                                   seed=SEED, student="smallcnn", normalization={"mean": [0.5] * 3, "std": [0.5] * 3})

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    store.writer.write_unit = broken
    n = manifest.shards[0].num_samples  # a whole shard: its unit is written (and fails) on the writer thread
    store.record(0, torch.arange(n), torch.randn(n, manifest.num_classes), torch.zeros(n, dtype=torch.long),
                 torch.zeros(n, 4, dtype=torch.int16))
    with pytest.raises(OSError, match="No space left"):
        store.finish_epoch(0)


def test_the_dump_writes_a_unit_index_that_verify_checks(small_shards, tmp_path):
    """Format 2: the dump ends by sealing each epoch's units into a pack and its unit index (their marker objects
    and chunk objects deleted: the index is their record); readers, verify and a rerun see the same finished
    units. An index entry that disagrees with a marker, or a doctored sealed entry, is caught."""
    import os

    from _cache_edit import unit_span, unseal

    from logitcache.cache import schema
    from logitcache.cache.reader import CacheReader
    from logitcache.cache.store import read_epoch_markers, read_marker
    from logitcache.cache.verify import cache_info, verify_cache

    cache = str(tmp_path / "cache.zarr")
    cfg = DumpConfig(data=str(small_shards), out=cache, teacher="smallcnn", recipe="small", epochs=2, topk=3,
                     seed=SEED, batch_size=8, progress=False)
    dump(cfg)
    reader = CacheReader(cache)
    group = reader.group
    markers = reader.markers(refresh=True)
    assert sorted(markers) == [(e, s) for e in range(2) for s in range(2)]
    assert not os.path.exists(os.path.join(cache, group, schema.UNITS_DIR))  # sealed: no marker objects
    info = cache_info(cache)["groups"][group]
    assert info["objects_per_unit"] == 0.5  # one pack per epoch of 2 units
    for e in range(2):
        assert read_epoch_markers(reader.objects, group, e) == {s: m for (ue, s), m in markers.items() if ue == e}
        assert read_marker(reader.objects, group, e, 1) == markers[(e, 1)]  # a fresh read finds the sealed unit
    assert verify_cache(cache).ok
    assert dump(cfg).units_written == 0  # a rerun finds every unit finished

    key = next(k for k in reader.objects.list(f"{group}/{schema.UNIT_INDEX_DIR}") if "/e00001-" in k)
    clean = reader.objects.get(key)
    reader.objects.put(key, clean.replace(b'"length":12', b'"length":11', 1))  # a sealed entry, doctored
    report = verify_cache(cache)
    assert not report.ok and any("(epoch 1, shard 0)" in p["where"] for p in report.problems), report.problems

    reader.objects.put(key, clean)
    unseal(cache, group)  # markers and no index, as format 1 and caches dumped before sealing
    dump(cfg)  # nothing to do but the indexes: written from the markers, which are then deleted
    assert not os.path.exists(os.path.join(cache, group, schema.UNITS_DIR)) and verify_cache(cache).ok
    unseal(cache, group)
    dump(cfg)
    # a seal stopped before its deletions left unit (1, 0)'s marker and chunk object next to its index entry,
    # and the entry was doctored since
    path, offset, length = unit_span(cache, group, 1, 0)
    with open(path, "rb") as f:
        f.seek(offset)
        reader.objects.put(schema.unit_chunk_keys(group, reader.meta, 1, 0)[schema.ROWS], f.read(length))
    reader.objects.put(schema.unit_marker_key(group, 1, 0), markers[(1, 0)].unpacked().to_bytes())
    reader.objects.put(key, clean.replace(b'"length":12', b'"length":11', 1))
    report = verify_cache(cache)
    assert not report.ok and any("unit index" in p["where"] and "differs from its marker" in p["what"]
                                 for p in report.problems)
    dump(cfg)  # the marker wins: the epoch is sealed again from it, its index rewritten
    assert verify_cache(cache).ok and not os.path.exists(os.path.join(cache, group, schema.UNITS_DIR))
    assert reader.objects.get(key) == clean


_COUNT_SYNCS_UNDER_TORCHRUN = """
import json, os, sys
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.train.syncs import SyncCounter

data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig(data=data, out=out, student="smallcnn", loss="ce", recipe="imagenet", image_size=32, epochs=1,
                  batch_size=4, lr=0.05, seed=3, progress=False)
with SyncCounter() as counter:
    train(cfg)
with open(os.path.join(out, f"syncs-{os.environ['RANK']}.json"), "w") as f:
    json.dump({"steps": counter.steps, "counts": dict(counter.counts), "other": dict(counter.other)}, f)
"""


def test_no_collective_per_step_on_two_gloo_ranks(imagenet_shards, tmp_path):
    """torchrun, 2 ranks on gloo, 3 shards of 8 (16 vs 8 samples: rank 1 repeats its last batch): the ranks keep
    in lockstep from the plan, with no collective and no other sync in any step."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "count_syncs.py"
    script.write_text(_COUNT_SYNCS_UNDER_TORCHRUN)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(imagenet_shards), str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / f"syncs-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 16 samples in batches of 4; rank 1 repeats twice
    assert [r["counts"] for r in ranks] == [{}, {}]
