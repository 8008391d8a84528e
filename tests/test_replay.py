"""The training-side data stage: cached views replayed pixel for pixel, with the teacher's rows; refusals of a
cache that does not belong to the data or recipe; skipped samples; the rank/worker split; fresh views."""

import warnings

import numpy as np
import pytest
import torch
from _data_helpers import IMAGENET_NUM_CLASSES, imagenet_like_samples, make_png_gray

from logitcache.cache.reader import CacheReader
from logitcache.cache.verify import verify_cache
from logitcache.data.shards import iter_shard
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, dump
from logitcache.errors import BadSampleError, CacheMismatchError
from logitcache.labels.topk import TopKLogits
from logitcache.replay import CachedViews, FreshViews, ReplayItem, check_cache_matches, collate
from logitcache.teacher import Teacher
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.views.recipe import apply_view, get_recipe, resolve_recipe, sample_view
from logitcache.views.rng import view_rng

SEED, EPOCHS, K = 7, 2, 5


@pytest.fixture(scope="module")
def cache(imagenet_shards, tmp_path_factory):
    """resnet18 (seeded random init) over the 3 x 8 ImageNet-style samples at 32 px, 2 epochs, top-5, T = 1, 4."""
    out = tmp_path_factory.mktemp("replay") / "cache.zarr"
    dump(DumpConfig(data=str(imagenet_shards), out=str(out), teacher="resnet18", recipe="imagenet", image_size=32,
                    epochs=EPOCHS, topk=K, temperatures=(1.0, 4.0), seed=SEED, batch_size=8, progress=False))
    return out


def originals(data) -> dict[int, torch.Tensor]:
    from logitcache.data.manifest import load_manifest

    m = load_manifest(data)
    return {s.index: s.image for i in range(len(m.shards)) for s in iter_shard(m, i)}


def test_replayed_views_are_the_pixels_and_rows_the_dump_recorded(imagenet_shards, cache):
    """For every (epoch, index): the image is apply_view(sample_view(view_rng(seed, e, i))) of the source, the
    teacher's logits recomputed on it equal the cached top-k (within the codec's bound), in DataLoader workers too."""
    recipe = get_recipe("imagenet", 32)
    source = originals(imagenet_shards)
    teacher = Teacher.load("resnet18", None, IMAGENET_NUM_CLASSES, 32, "cpu", SEED)
    for epoch in range(EPOCHS):
        views = CachedViews(imagenet_shards, cache, epoch=epoch, return_index=True)
        loader = torch.utils.data.DataLoader(views, batch_size=5, num_workers=2, collate_fn=collate)
        seen = []
        for images, rows, target, index in loader:
            assert isinstance(rows, TopKLogits) and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            for x, i in zip(images, index.tolist(), strict=True):
                _, h, w = source[i].shape
                expected = apply_view(source[i], sample_view(view_rng(SEED, epoch, i), h, w, recipe), recipe)
                assert torch.equal(x, expected), f"epoch {epoch} sample {i}: not the dump's view"
            with torch.inference_mode():
                z = teacher.logits(images)
            # format 2 (the dump's default): log-probabilities within the codec's stated bound
            bound = 2.5 * CacheReader(str(cache)).meta.packed_codec().step + 1e-4  # FORMAT.md: after normalising
            for t in (1.0, 4.0):
                lp = torch.log_softmax(z / t, 1)
                torch.testing.assert_close(lp.gather(1, rows.indices), rows.topk_log_probs(t), atol=bound, rtol=0)
                torch.testing.assert_close(lp.gather(1, target[:, None])[:, 0], rows.target_log_probs(t),
                                           atol=bound, rtol=0)
            assert torch.equal(rows.target, target)
            seen += index.tolist()
        assert sorted(seen) == list(range(24))


def test_fresh_views_with_the_dump_seed_are_the_cached_views(imagenet_shards, cache):
    cached = {i: x for x, _, _, i in CachedViews(imagenet_shards, cache, epoch=1, return_index=True)}
    fresh = {i: x for x, _, i in FreshViews(imagenet_shards, seed=SEED, epoch=1, recipe="imagenet", image_size=32,
                                            return_index=True)}
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[i], fresh[i]) for i in cached)
    other = {i: x for x, _, i in FreshViews(imagenet_shards, seed=SEED + 1, epoch=1, recipe="imagenet",
                                            image_size=32, return_index=True)}
    assert sum(torch.equal(cached[i], other[i]) for i in cached) < len(cached) // 2


def test_more_epochs_than_cached_cycle_the_views_and_say_so(imagenet_shards, cache):
    first = [(i, x) for x, _, _, i in CachedViews(imagenet_shards, cache, epoch=0, return_index=True)]
    with pytest.warns(UserWarning, match=r"holds 2 epoch\(s\) of views; training epoch 2 .* cached epoch e mod 2"):
        views = CachedViews(imagenet_shards, cache, epoch=2, return_index=True)
    again = [(i, x) for x, _, _, i in views]
    assert [i for i, _ in first] == [i for i, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    with warnings.catch_warnings():  # said once, not every epoch
        warnings.simplefilter("error")
        CachedViews(imagenet_shards, cache, epoch=3)


def test_other_recipe_is_refused_naming_the_settings(imagenet_shards, cache):
    with pytest.raises(CacheMismatchError, match=r"image_size: cache has 32, requested 48"):
        CachedViews(imagenet_shards, cache, epoch=0, recipe=get_recipe("imagenet", 48))
    with pytest.raises(CacheMismatchError, match=r"name: cache has 'imagenet', requested 'small'"):
        check_cache_matches(CacheReader(str(cache)), imagenet_shards, get_recipe("small", 32))
    assert check_cache_matches(CacheReader(str(cache)), imagenet_shards) == get_recipe("imagenet", 32)
    assert get_recipe("imagenet", 32).version == 3  # what a dump makes now; version 1 is another recipe
    with pytest.raises(CacheMismatchError, match=r"version: cache has 3, requested 1"):
        CachedViews(imagenet_shards, cache, epoch=0, recipe=get_recipe("imagenet@1", 32))
    with pytest.raises(CacheMismatchError, match=r"interpolation: cache has 'bilinear-antialias-torch', requested "
                                                 r"'bilinear-antialias-pillow'\n  version: cache has 3, requested 2"):
        CachedViews(imagenet_shards, cache, epoch=0, recipe=get_recipe("imagenet@2", 32))


def test_an_imagenet_v1_cache_still_replays_trains_and_verifies(imagenet_shards, tmp_path):
    """A cache of ``imagenet`` v1 (source-pixel boxes: what every dump made before v2, and ``--recipe imagenet@1``
    now) replays v1's views byte-exactly in workers, verifies, trains with ``--recipe imagenet`` (the cache's
    version decides), and refuses a v2 request."""
    out = tmp_path / "v1.zarr"
    dump(DumpConfig(data=str(imagenet_shards), out=str(out), teacher="resnet18", recipe="imagenet@1", image_size=32,
                    epochs=1, topk=K, temperatures=(1.0,), seed=SEED, batch_size=8, progress=False))
    meta = CacheReader(str(out)).meta
    assert meta.recipe["version"] == 1 and meta.recipe["param_fields"] == ["top", "left", "height", "width", "flip"]
    v1, v2, source = get_recipe("imagenet", 32, 1), get_recipe("imagenet", 32), originals(imagenet_shards)
    loader = torch.utils.data.DataLoader(CachedViews(imagenet_shards, out, epoch=0, return_index=True),
                                         batch_size=5, num_workers=2, collate_fn=collate)
    seen, same_as_v2 = 0, 0
    for images, _, _, index in loader:
        for x, i in zip(images, index.tolist(), strict=True):
            _, h, w = source[i].shape
            assert torch.equal(x, apply_view(source[i], sample_view(view_rng(SEED, 0, i), h, w, v1), v1)), i
            same_as_v2 += torch.equal(x, apply_view(source[i], sample_view(view_rng(SEED, 0, i), h, w, v2), v2))
            seen += 1
    assert seen == 24 and same_as_v2 < 12  # the v1 views, not v2's
    assert verify_cache(str(out), data=str(imagenet_shards)).ok
    assert resolve_recipe("imagenet", None, cached=meta.recipe) == v1
    with pytest.raises(CacheMismatchError, match="version 1"):
        resolve_recipe("imagenet@2", None, cached=meta.recipe)
    with pytest.raises(CacheMismatchError, match=r"version: cache has 1, requested 3"):  # v2 = the newest, v3
        CachedViews(imagenet_shards, out, epoch=0, recipe=v2)
    common = dict(data=str(imagenet_shards), student="smallcnn", loss="nkd", cache=str(out), epochs=1,
                  batch_size=8, progress=False)
    train(TrainConfig(out=str(tmp_path / "run"), recipe="imagenet", **common))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(CacheMismatchError, match="version 1"):
        train(TrainConfig(out=str(tmp_path / "run2"), recipe="imagenet@2", **common))


def test_changed_shard_is_refused_naming_it(cache, tmp_path):
    """Same keys, one image re-encoded in shard 1: the fingerprint differs and the message names shard 1."""
    from _data_helpers import make_jpeg

    samples = list(imagenet_like_samples(24))
    key, parts = samples[10]
    samples[10] = (key, {**parts, "jpg": make_jpeg(np.random.default_rng(99), 50, 60, quality=70)})
    write_shards(iter(samples), tmp_path / "changed", class_names=[f"n{i:08d}" for i in range(IMAGENET_NUM_CLASSES)],
                 samples_per_shard=8)
    with pytest.raises(CacheMismatchError) as err:
        CachedViews(tmp_path / "changed", cache, epoch=0)
    msg = str(err.value)
    assert "shard 1 (shard-000001.tar) differs" in msg and "sha256" in msg
    assert "shard 0 " not in msg and "shard 2 " not in msg


def test_samples_the_dump_skipped_are_never_trained_on(tmp_path):
    """A corrupt sample skipped by the dump has zero padding as its row: the stage leaves it out."""
    rng = np.random.default_rng(3)
    samples = [(f"s{i:03d}", {"png": make_png_gray(rng), "cls": str(i % 10).encode()}) for i in range(12)]
    samples[4] = ("s004", {"png": b"not a png", "cls": b"4"})
    write_shards(iter(samples), tmp_path / "data", class_names=[str(c) for c in range(10)], samples_per_shard=6)
    out = tmp_path / "cache.zarr"
    dump(DumpConfig(data=str(tmp_path / "data"), out=str(out), teacher="smallcnn", recipe="small", epochs=1, topk=3,
                    skip_bad=True, progress=False))
    assert CacheReader(str(out)).markers()[(0, 0)].skipped == (4,)
    indices = [i for *_, i in CachedViews(tmp_path / "data", out, epoch=0, skip_bad=True, return_index=True)]
    assert sorted(indices) == [i for i in range(12) if i != 4]
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar:s004"):
        list(CachedViews(tmp_path / "data", out, epoch=0))


def test_ranks_and_workers_split_whole_shards_and_the_order_is_a_function_of_seed_and_epoch(imagenet_shards, cache):
    def indices(epoch, rank, world, workers, seed=0):
        views = CachedViews(imagenet_shards, cache, epoch=epoch, rank=rank, world_size=world, shuffle_seed=seed,
                            return_index=True)
        loader = torch.utils.data.DataLoader(views, batch_size=4, num_workers=workers, collate_fn=collate)
        return [i for *_, idx in loader for i in idx.tolist()]

    r0, r1 = indices(0, 0, 2, 2), indices(0, 1, 2, 2)
    assert sorted(r0 + r1) == list(range(24)) and not set(r0) & set(r1)
    for part in (r0, r1):  # whole shards: each shard a rank touches, it holds completely
        assert sorted(part) == sorted(i for s in {i // 8 for i in part} for i in range(8 * s, 8 * s + 8))
    assert indices(0, 0, 1, 2) == indices(0, 0, 1, 2)  # a pure function: the same order every time
    assert indices(0, 0, 1, 2) != indices(1, 0, 1, 2)  # another epoch, another order
    assert sorted(indices(1, 0, 1, 0)) == list(range(24))


def test_no_shuffle_keeps_shard_and_sample_order(imagenet_shards, cache):
    got = [i for *_, i in CachedViews(imagenet_shards, cache, epoch=0, return_index=True)]
    assert got == list(range(24))
    got = [i for *_, i in CachedViews(imagenet_shards, cache, epoch=0, shards=[2, 0], return_index=True)]
    assert got == [*range(16, 24), *range(0, 8)]


def test_collate_batches_columns_and_keeps_named_tuples():
    row = TopKLogits.from_logits(torch.randn(2, 6), torch.tensor([1, 2]), 3)
    items = [ReplayItem(torch.zeros(3, 4, 4, dtype=torch.uint8), row[j], j, 10 + j, np.arange(5, dtype=np.int16))
             for j in range(2)]
    batch = collate(items)
    assert isinstance(batch, ReplayItem) and batch.image.shape == (2, 3, 4, 4)
    assert torch.equal(batch.soft.indices, row.indices) and batch.target.tolist() == [0, 1]
    assert batch.index.tolist() == [10, 11] and batch.view.shape == (2, 5)
    plain = collate([(torch.ones(2), None, 3), (torch.zeros(2), None, 4)])
    assert plain[1] is None and plain[2].tolist() == [3, 4] and plain[0].shape == (2, 2)
