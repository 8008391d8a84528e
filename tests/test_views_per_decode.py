"""``views_per_decode`` N (issue 17): each decoded image yields its views for N consecutive epochs (a pass).
Every (image, epoch) view of the pass comes exactly once, pixel for pixel the N = 1 one; no batch holds two views
of one image; refusals; `train --views-per-decode`: N logged epochs per pass, resume (clean stop and SIGKILL
mid-pass), 2-process DDP sample accounting."""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from logitcache.data.manifest import load_manifest
from logitcache.data.spread import SpreadWarning, spread_possible, spread_stream, spread_views, window_plan
from logitcache.data.tar import tarfile_samples
from logitcache.dump import DumpConfig, dump
from logitcache.errors import LogitcacheError
from logitcache.models.weights import load_checkpoint
from logitcache.replay import DEFAULT_STREAMS, CachedViews, FreshViews, RowSource, cached_views_stage, collate
from logitcache.train.config import TrainConfig, learning_rate
from logitcache.train.lockstep import pass_epoch_ends, planned_steps
from logitcache.train.loop import KILL_AFTER_STEPS_ENV, train
from logitcache.views.recipe import apply_view, crop_box, get_recipe, sample_view

SEED, EPOCHS = 5, 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache4(imagenet_shards, tmp_path_factory):
    """resnet18 (seeded random init) over the 3 x 8 ImageNet-style samples at 32 px, 4 epochs, top-5."""
    out = tmp_path_factory.mktemp("vpd") / "cache.zarr"
    dump(DumpConfig(data=str(imagenet_shards), out=str(out), teacher="resnet18", recipe="imagenet", image_size=32,
                    epochs=EPOCHS,
                    topk=5, seed=SEED, batch_size=8, progress=False))
    return out


def items(views, batch_size, workers):
    loader = torch.utils.data.DataLoader(views, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return list(loader)


@pytest.mark.parametrize(("n", "epoch", "workers", "batch"), [(2, 0, 0, 5), (2, 2, 2, 4), (4, 0, 2, 8), (4, 4, 0, 3)])
def test_a_pass_yields_each_views_of_its_epochs_exactly_once_and_never_two_in_a_batch(imagenet_shards, cache4, n,
                                                                                      epoch, workers, batch):
    """Epoch 4 with 4 cached epochs: the pass replays cached epochs 0-3 again (the cycle)."""
    views = CachedViews(imagenet_shards, cache4, epoch=epoch, shuffle_seed=1, views_per_decode=n, batch_size=batch,
                        return_items=True)
    assert views.view_epochs == list(range(epoch, epoch + n))
    reference = {}  # (index, epoch) -> item, from N = 1 datasets
    for e in views.view_epochs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for item in CachedViews(imagenet_shards, cache4, epoch=e, return_items=True):
                reference[(item.index, e)] = item
    batches = items(views, batch, workers)
    got = [(int(i), int(e)) for b in batches for i, e in zip(b.index, b.epoch, strict=True)]
    assert sorted(got) == sorted(reference) and len(got) == 24 * n  # each view of the pass, exactly once
    for b in batches:
        assert len(set(b.index.tolist())) == len(b.index), "a batch holds two views of one image"
        for k, (i, e) in enumerate(zip(b.index.tolist(), b.epoch.tolist(), strict=True)):
            ref = reference[(i, e)]
            assert torch.equal(b.image[k], ref.image) and torch.equal(b.view[k], torch.from_numpy(ref.view))
            assert torch.equal(b.soft.logits[k], ref.soft.logits[0]) and b.target[k] == ref.target
    assert len(batches) == views.num_batches(batch, workers)


def test_fresh_views_per_decode_are_the_views_of_each_epoch(imagenet_shards):
    views = FreshViews(imagenet_shards, seed=SEED, epoch=2, recipe="imagenet", image_size=32, shuffle_seed=0,
                       views_per_decode=2, batch_size=6, return_items=True)
    got = {(int(i), int(e)): x for b in items(views, 6, 0) for x, i, e in zip(b.image, b.index, b.epoch, strict=True)}
    for e in (2, 3):
        for x, _, i in FreshViews(imagenet_shards, seed=SEED, epoch=e, recipe="imagenet", image_size=32,
                                  return_index=True):
            assert torch.equal(got.pop((i, e)), x)
    assert not got


def test_ranks_split_the_pass_and_the_order_is_a_function_of_seed_and_pass(imagenet_shards, cache4):
    def pairs(rank, world, workers, seed=0, epoch=0):
        views = CachedViews(imagenet_shards, cache4, epoch=epoch, rank=rank, world_size=world, shuffle_seed=seed,
                            views_per_decode=2, batch_size=4, return_items=True)
        return [(int(i), int(e)) for b in items(views, 4, workers) for i, e in zip(b.index, b.epoch, strict=True)]

    r0, r1 = pairs(0, 2, 1), pairs(1, 2, 1)
    assert sorted(r0 + r1) == sorted(pairs(0, 1, 0)) == [(i, e) for i in range(24) for e in (0, 1)]
    assert pairs(0, 2, 1) == r0 and pairs(0, 2, 1, seed=1) != r0 and pairs(0, 2, 1, epoch=2) != [
        (i, e + 2) for i, e in r0]


def test_the_spread_stage_keeps_views_apart_exactly_when_a_worker_holds_a_batch_of_images():
    """Exhaustive over small cases: every view once; no batch with two views of one image whenever the worker
    holds at least batch_size images (and a warning, never silence, when it does not)."""
    rng = random.Random(0)
    for num, n, b, buffer in itertools.product(range(0, 40), (2, 3, 4, 8), (1, 2, 3, 5, 8), (0, 50)):
        groups = [[(i, e) for e in range(n)] for i in range(num)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = list(spread_views(groups, window_plan(num, n, b, buffer), b, rng))
        assert sorted(out) == [v for g in groups for v in g]
        apart = all(len({i for i, _ in out[k:k + b]}) == len(out[k:k + b]) for k in range(0, len(out), b))
        assert apart == spread_possible(num, b) == (not caught), (num, n, b, buffer)
        assert all(issubclass(w.category, SpreadWarning) for w in caught)



def test_the_streaming_spread_keeps_views_apart_exactly_when_the_stream_holds_a_batch_of_images():
    """`spread_stream` (the webdataset stage: the stream's length is unknown): the same guarantee, exhaustively."""
    rng = random.Random(0)
    for num, n, b in itertools.product(range(0, 60), (2, 3, 4, 8), (1, 2, 3, 5, 8)):
        groups = [[(i, e) for e in range(n)] for i in range(num)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = list(spread_stream(iter(groups), n, b, rng))
        assert sorted(out) == [v for g in groups for v in g]
        apart = all(len({i for i, _ in out[k:k + b]}) == len(out[k:k + b]) for k in range(0, len(out), b))
        assert apart == spread_possible(num, b) == (not caught), (num, n, b)
        assert all(issubclass(w.category, SpreadWarning) for w in caught)


@pytest.mark.parametrize(("n", "epoch", "batch", "seed"), [(2, 2, 4, 0), (4, 0, 5, None)])
def test_the_webdataset_stage_yields_each_view_of_its_pass_once_and_never_two_in_a_batch(imagenet_shards, cache4, n,
                                                                                          epoch, batch, seed):
    m = load_manifest(imagenet_shards)
    urls = [m.shard_url(i) for i in range(len(m.shards))][::-1]
    stage = cached_views_stage(imagenet_shards, cache4, epoch=epoch, views_per_decode=n, batch_size=batch,
                               shuffle_seed=seed)
    assert stage.view_epochs == list(range(epoch, epoch + n))
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), tarfile_samples, stage,
                                wds.to_tuple("image", "soft", "target", "index", "epoch"),
                                wds.batched(batch, collation_fn=collate, partial=True))
    batches = list(pipeline)
    reference = {}
    for e in stage.view_epochs:
        for image, soft, target, index in CachedViews(imagenet_shards, cache4, epoch=e, return_index=True):
            reference[(int(index), e)] = (image, soft, target)
    seen = []
    for images, soft, target, index, epochs in batches:
        assert len(set(index.tolist())) == len(index), "a batch holds two views of one image"
        for k, (i, e) in enumerate(zip(index.tolist(), epochs.tolist(), strict=True)):
            ref = reference[(i, e)]
            assert torch.equal(images[k], ref[0]) and target[k] == ref[2]
            assert torch.equal(soft.logits[k], ref[1].logits[0]) and torch.equal(soft.indices[k], ref[1].indices[0])
            seen.append((i, e))
    assert sorted(seen) == sorted(reference) and len(seen) == 24 * n  # each view of the pass, exactly once
    with pytest.raises(ValueError, match=r"views_per_decode=3 does not divide the 4 epoch\(s\).*\[1, 2, 4\]"):
        cached_views_stage(imagenet_shards, cache4, epoch=0, views_per_decode=3, batch_size=4)
    with pytest.raises(ValueError, match="needs the batch_size"):
        cached_views_stage(imagenet_shards, cache4, epoch=0, views_per_decode=2)
    with pytest.raises(ValueError, match="a pass starts at a multiple of it; got epoch 1"):
        stage.set_epoch(1) if n == 2 else cached_views_stage(imagenet_shards, cache4, epoch=1, views_per_decode=4,
                                                             batch_size=4)

def test_views_per_decode_refusals(imagenet_shards, cache4, tmp_path):
    with pytest.raises(ValueError, match=r"views_per_decode=3 does not divide the 4 epoch\(s\).*\[1, 2, 4\]"):
        CachedViews(imagenet_shards, cache4, epoch=0, views_per_decode=3, batch_size=4)
    with pytest.raises(ValueError, match="starts at a multiple of it; got epoch 1"):
        CachedViews(imagenet_shards, cache4, epoch=1, views_per_decode=2, batch_size=4)
    with pytest.raises(ValueError, match="needs the DataLoader's batch_size"):
        CachedViews(imagenet_shards, cache4, epoch=0, views_per_decode=2)
    with pytest.raises(ValueError, match="views_per_decode must be >= 1"):
        FreshViews(imagenet_shards, seed=0, epoch=0, recipe="imagenet", views_per_decode=0)
    views = CachedViews(imagenet_shards, cache4, epoch=0, views_per_decode=2, batch_size=9)
    views.check_spread(1)  # 24 samples in one worker
    with pytest.raises(ValueError, match=r"rank 0 worker 1 reads 8 sample\(s\).*fewer than one batch \(9\)"):
        views.check_spread(2)
    with pytest.raises(ValueError, match="PS-KD"):
        FreshViews(imagenet_shards, seed=0, epoch=0, recipe="imagenet", views_per_decode=2, batch_size=4,
                   rows=RowSource(None, 0))


# ------------------------------------------------------------------ train --views-per-decode
@pytest.fixture(scope="module")
def small_cache(small_shards, tmp_path_factory):
    """smallcnn (seeded random init) over the 2 x 12 small samples: 2 cached epochs, k = 10."""
    out = tmp_path_factory.mktemp("vpd_small") / "cache.zarr"
    dump(DumpConfig(data=str(small_shards), out=str(out), teacher="smallcnn", recipe="small", epochs=2, topk=10,
                    seed=SEED, batch_size=8, progress=False))
    return out


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), student="smallcnn", loss="nkd", epochs=2, batch_size=5, lr=0.05,
                seed=SEED, progress=False, views_per_decode=2)
    return TrainConfig(**{**base, **kw})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run) / "checkpoints" / "last.pt")["model"]


def figures(lines) -> list[dict]:
    return [{k: v for k, v in m["train"].items() if k not in ("seconds", "images_per_s")} for m in lines]


def test_a_pass_is_logged_as_n_epochs_of_views(small_shards, small_cache, tmp_path):
    """4 epochs with N = 2 and a 2-epoch cache: 2 passes, 4 lines; each pass trains 2 x 24 views in the planned
    steps, split into two logged epochs; the learning rate is the N = 1 schedule's at the same progress."""
    train(cfg(small_shards, tmp_path / "run", cache=str(small_cache), epochs=4, val=str(small_shards)))
    lines = metrics(tmp_path / "run")
    m = load_manifest(small_shards)
    steps = planned_steps(m, [0, 1], SEED, 0, 1, 5, DEFAULT_STREAMS, 2)
    assert steps == 2 * 5  # each of 24 images twice, in batches of 5: 48 views -> 10 steps
    assert [x["epoch"] for x in lines] == [0, 1, 2, 3] and [x["pass"] for x in lines] == [0, 0, 1, 1]
    assert [x["step"] for x in lines] == [5, 10, 15, 20] == [p * steps + e for p in (0, 1)
                                                            for e in pass_epoch_ends(steps, 2)]
    assert [x["train"]["samples"] for x in lines] == [25, 23, 25, 23]  # steps of 5 views; the pass's 48 in all
    assert [x["train"]["samples_skipped"] for x in lines] == [0, 0, 0, 0]
    assert all(x["cache_epoch"] == [0, 1] and x["views_per_decode"] == 2 and x["val"]["n"] == 24 for x in lines)
    c = cfg(small_shards, "x", cache=str(small_cache), epochs=4)
    assert [x["lr"] for x in lines] == pytest.approx([learning_rate(c, t, 0.2) for t in (0.8, 1.8, 2.8, 3.8)])


def test_train_refusals(small_shards, small_cache, tmp_path):
    with pytest.raises(ValueError, match="--views-per-decode must be >= 1 and divide --epochs"):
        cfg(small_shards, tmp_path / "a", epochs=3)
    with pytest.raises(ValueError, match="pskd.*--views-per-decode 1"):
        cfg(small_shards, tmp_path / "a", loss="pskd", recipe="small")
    with pytest.raises(LogitcacheError, match=r"does not divide the 2 epoch\(s\)"):
        train(cfg(small_shards, tmp_path / "b", cache=str(small_cache), epochs=4, views_per_decode=4))
    with pytest.raises(LogitcacheError, match=r"rank 0 stream 0 reads 12 sample\(s\).*fewer than one batch \(16\)"):
        train(cfg(small_shards, tmp_path / "c", cache=str(small_cache), batch_size=16, workers=2))


def test_stop_mid_pass_then_resume_equals_an_uninterrupted_run(small_shards, small_cache, tmp_path):
    common = dict(cache=str(small_cache), epochs=4, warmup_epochs=1)
    train(cfg(small_shards, tmp_path / "full", **common))
    train(cfg(small_shards, tmp_path / "part", **common), stop_after_epochs=1)  # inside pass 0
    assert len(metrics(tmp_path / "part")) == 1
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["epoch_complete"], ckpt["batches_done"]) == (0, True, 5)
    train(cfg(small_shards, tmp_path / "part", resume=True, **common), stop_after_epochs=2)  # to the middle of pass 1
    train(cfg(small_shards, tmp_path / "part", resume=True, **common))
    assert figures(metrics(tmp_path / "full")) == figures(metrics(tmp_path / "part"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_pass_then_resume_equals_an_uninterrupted_run(small_shards, small_cache, tmp_path):
    """A real SIGKILL at step 7 of a 10-step pass (inside its second logged epoch), checkpoints every 3 steps."""
    args = ["--data", str(small_shards), "--student", "smallcnn", "--loss", "nkd", "--cache", str(small_cache),
            "--epochs", "2", "--batch-size", "5", "--lr", "0.05", "--seed", str(SEED), "--workers", "1",
            "--views-per-decode", "2", "--checkpoint-every", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(extra, env_extra=None):
        return subprocess.run([sys.executable, "-m", "logitcache.cli", "train", *args, *extra], capture_output=True,
                              text=True, cwd=REPO, env={**env, **(env_extra or {})}, timeout=300)

    killed = cli(["--out", str(tmp_path / "killed")], {KILL_AFTER_STEPS_ENV: "7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["batches_done"], ckpt["epoch_complete"], ckpt["step"]) == (1, 6, False, 6)
    resumed = cli(["--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same float reductions
    try:
        train(cfg(small_shards, tmp_path / "full", cache=str(small_cache), workers=1, checkpoint_every=3))
    finally:
        torch.set_num_threads(threads)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert figures(metrics(tmp_path / "full")) == figures(metrics(tmp_path / "killed"))


def test_two_process_ddp_trains_each_view_of_a_pass_once(imagenet_shards, tmp_path):
    """3 shards on 2 ranks (16 vs 8 images), N = 2, teacher-free: per pass the ranks train 2 x 24 views — the
    1-process run's count — in lockstep for the planned steps; validation sees each sample once."""
    def run(out, nproc):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                  if nproc > 1 else [sys.executable])
        cmd = [*launch, "-m", "logitcache.cli", "train", "--data", str(imagenet_shards), "--val",
               str(imagenet_shards), "--out", str(out), "--student", "smallcnn", "--loss", "tf-nkd", "--recipe",
               "imagenet", "--image-size", "32", "--epochs", "4", "--batch-size", "4", "--seed", str(SEED),
               "--views-per-decode", "2", "--no-progress"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return metrics(out)

    ddp, single = run(tmp_path / "ddp", 2), run(tmp_path / "one", 1)
    for lines in (ddp, single):
        assert [m["epoch"] for m in lines] == [0, 1, 2, 3] and [m["pass"] for m in lines] == [0, 0, 1, 1]
        for p in (0, 1):
            assert sum(m["train"]["samples"] for m in lines if m["pass"] == p) == 2 * 24
        assert all(m["train"]["samples_skipped"] == 0 and m["val"]["n"] == 24 for m in lines)
    m = load_manifest(imagenet_shards)
    assert ddp[-1]["step"] == sum(planned_steps(m, [0, 1, 2], SEED, e, 2, 4, DEFAULT_STREAMS, 2) for e in (0, 2))
    assert single[-1]["step"] == sum(planned_steps(m, [0, 1, 2], SEED, e, 1, 4, DEFAULT_STREAMS, 2) for e in (0, 2))


def test_the_per_view_path_gives_pillows_own_pixels():
    """The per-view path (PIL unpacks a channels-last crop where it lies; the view leaves as contiguous planes) gives
    exactly the pixels of the plain Pillow route: copy the crop, ``Image.fromarray``, resize, flip, ``np.array``;
    imagenet v3's (torch reads the channels-last crop where it lies) those of resizing a contiguous copy."""
    rng = np.random.default_rng(3)
    for H, W in ((37, 53), (1, 9), (64, 20), (30, 1)):
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        for image in (torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(a.transpose(2, 0, 1).copy())):
            for recipe in (get_recipe("imagenet", 24, 2), get_recipe("imagenet", 24, 1), get_recipe("small", 16),
                           get_recipe("imagenet", 24)):
                for _ in range(8):
                    p = sample_view(rng, H, W, recipe)
                    if recipe.name == "small":
                        q = recipe.pad
                        crop = np.pad(a, ((q, q), (q, q), (0, 0)))[p.top + q:p.top + q + H, p.left + q:p.left + q + W]
                    else:
                        t, lft, h, w = crop_box(p, recipe, H, W)
                        crop = a[t:t + h, lft:lft + w]
                    if recipe.torch_mode:
                        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None]
                        y = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", antialias=True)[0]
                        want = (y.flip(-1) if p.flip else y).permute(1, 2, 0).numpy()
                    else:
                        im = Image.fromarray(np.ascontiguousarray(crop)).resize((recipe.image_size,) * 2,
                                                                                recipe.resample)
                        want = np.array(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p.flip else im)
                    got = apply_view(image, p, recipe)
                    assert np.array_equal(got.permute(1, 2, 0).numpy(), want), (H, W, recipe.name, p)
    assert collate([(got,), (got,)])[0].is_contiguous()


def test_mixed_views_of_a_pass_are_the_n1_views_in_the_loader_and_the_webdataset_stage(small_shards, tmp_path):
    """A mixing recipe (deit: each view mixed with its stored partner of the unit): with N = 2 every (image, epoch)
    view is the N = 1 one — pixels, mixed target, partner and λ, teacher row — through CachedViews and the stage."""
    cache = tmp_path / "deit.zarr"
    dump(DumpConfig(data=str(small_shards), out=str(cache), teacher="smallcnn", recipe="deit", image_size=28,
                    epochs=2, topk=10, seed=SEED, batch_size=8, progress=False))
    reference = {}
    for e in (0, 1):
        for item in CachedViews(small_shards, cache, epoch=e, return_items=True):
            reference[(item.index, e)] = item
    assert any(item.lam < 1.0 for item in reference.values())  # the recipe mixed some views
    got = [x for b in items(CachedViews(small_shards, cache, epoch=0, shuffle_seed=2, views_per_decode=2,
                                        batch_size=4, return_items=True), 4, 0)
           for x in zip(b.index.tolist(), b.epoch.tolist(), b.image, b.partner_target, b.lam, b.soft.logits,
                        strict=True)]
    assert sorted((i, e) for i, e, *_ in got) == sorted(reference)
    for i, e, image, partner, lam, logits in got:
        ref = reference[(i, e)]
        assert torch.equal(image, ref.image) and partner == ref.partner_target and lam == pytest.approx(ref.lam)
        assert torch.equal(logits, ref.soft.logits[0])
    m = load_manifest(small_shards)
    stage = cached_views_stage(small_shards, cache, epoch=0, views_per_decode=2, batch_size=4)
    pipeline = wds.DataPipeline(wds.SimpleShardList([m.shard_url(i) for i in range(len(m.shards))]), tarfile_samples,
                                stage, wds.to_tuple("image", "soft", "target", "index", "epoch"))
    seen = set()
    for image, soft, target, i, e in pipeline:
        ref = reference[(i, e)]
        want = ref.lam * torch.nn.functional.one_hot(torch.tensor(ref.target), 10) + (1 - ref.lam) * \
            torch.nn.functional.one_hot(torch.tensor(ref.partner_target), 10)
        assert torch.equal(image, ref.image) and torch.allclose(target, want.float())
        assert torch.equal(soft.logits, ref.soft.logits)
        seen.add((i, e))
    assert seen == set(reference)
