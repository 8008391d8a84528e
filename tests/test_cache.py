"""CacheWriter / CacheReader on the schema, without a teacher: round trip, markers, refusals, fork safety."""

import json
import pickle

import numpy as np
import pytest
import torch
from _fake_cache import SHARD_LENGTHS, K, _metas, write_fake_cache

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.schema import UnitRows
from logitcache.cache.writer import CacheWriter
from logitcache.errors import CacheError, CacheMismatchError


@pytest.fixture
def cache(tmp_path):
    return write_fake_cache(str(tmp_path / "cache.zarr"))


def test_round_trip(cache):
    url, expected = cache
    r = CacheReader(url)
    assert r.group == "resnet34" and r.meta.k == K and r.root_meta.shard_lengths == SHARD_LENGTHS
    for (e, s), (_, rows) in expected.items():
        got = r.read_unit(e, s)
        for name, arr in rows.as_dict().items():
            np.testing.assert_array_equal(getattr(got, name), arr)
    # batch API: global indices across both shards, answered in the order asked
    tk, views = r.rows(1, [7, 0, 9, 5], targets=[3, 1, 2, 0])
    np.testing.assert_array_equal(tk.indices.numpy(), np.stack([
        expected[(1, 1)][1].topk_indices[1], expected[(1, 0)][1].topk_indices[0],
        expected[(1, 1)][1].topk_indices[3], expected[(1, 0)][1].topk_indices[5]]))
    assert views.shape == (4, 3)
    # training epochs past the cached ones cycle the views
    assert r.cached_epoch(5) == 1


def test_cached_log_probs_match_within_fp16(cache):
    url, expected = cache
    tk_dense, _ = expected[(0, 0)]
    r = CacheReader(url)
    unit = r.read_unit(0, 0)
    tk = r.topk_rows(unit, np.arange(6), tk_dense.target)
    torch.testing.assert_close(tk.log_probs(4.0), tk_dense.log_probs(4.0), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(tk.target_logprob, tk_dense.target_logprob)  # float32: exact


def test_unit_without_marker_is_unfinished(cache):
    url, _ = cache
    (CacheReader(url).objects).delete(schema.unit_marker_key("resnet34", 1, 0))
    with pytest.raises(CacheError, match=r"unit \(epoch 1, shard 0\) is unfinished"):
        CacheReader(url).read_unit(1, 0)


def test_all_zero_chunks_are_stored(tmp_path):
    url = str(tmp_path / "c.zarr")
    root, meta = _metas()
    w = CacheWriter.create_or_open(url, "g", meta, root, {})
    n = SHARD_LENGTHS[1]
    zeros = UnitRows(np.zeros((n, K), np.int16), np.zeros((n, K), np.float16), np.zeros(n, np.float32),
                     np.zeros((n, 2), np.float32), np.zeros((n, 3), np.int16))
    marker = w.write_unit(0, 1, np.arange(n), zeros, n, {})
    assert set(marker.chunks) == set(schema.ARRAY_NAMES)
    for name in schema.ARRAY_NAMES:
        ndim = 3 + (name != schema.TARGET_LOGPROB)
        assert w.objects.exists(schema.chunk_key("g", name, 0, 1, ndim))


def test_settings_mismatch_is_refused_naming_the_setting(cache):
    url, _ = cache
    root, meta = _metas(k=7)
    with pytest.raises(CacheMismatchError, match=r"k: cache has 5, requested 7"):
        CacheWriter.create_or_open(url, "resnet34", meta, root, {})


def test_other_data_is_refused(cache):
    url, _ = cache
    root, meta = _metas(fingerprint="c" * 64)
    with pytest.raises(CacheMismatchError, match="other data"):
        CacheWriter.create_or_open(url, "resnet34", meta, root, {})


def test_more_epochs_later_leaves_old_units_untouched(cache):
    url, _ = cache
    objects = CacheReader(url).objects
    before = {k: objects.get(k) for k in _all_chunk_keys(objects)}
    root, meta = _metas(epochs=3)
    w = CacheWriter.create_or_open(url, "resnet34", meta, root, {})
    assert CacheReader(url).meta.epochs == 3
    assert {k: objects.get(k) for k in before} == before
    assert set(w.finished_units()) == {(e, s) for e in range(2) for s in range(2)}


def _all_chunk_keys(objects):
    fs, root = objects.fs, objects.root
    return sorted(p[len(root) + 1:] for p in fs.find(root) if "/c/" in p)


def test_newer_major_format_is_refused(cache):
    url, _ = cache
    zjson = CacheReader(url).objects.path("zarr.json")
    d = json.loads(open(zjson).read())
    d["attributes"]["logitcache"]["format_version"] = [99, 0]
    open(zjson, "w").write(json.dumps(d))
    with pytest.raises(CacheError, match="format version"):
        _ = CacheReader(url).meta


def test_two_groups_need_a_choice(cache):
    url, _ = cache
    root, meta = _metas()
    CacheWriter.create_or_open(url, "resnet50", meta, root, {})
    with pytest.raises(CacheError, match=r"teacher groups \['resnet34', 'resnet50'\]"):
        _ = CacheReader(url).meta
    assert CacheReader(url, "resnet50").groups == ["resnet34", "resnet50"]


class _UnitDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.reader.read_unit(i // 2, i % 2).topk_indices.astype(np.int64))


def test_reader_in_forked_workers_after_parent_touched_zarr(cache):
    url, expected = cache
    reader = CacheReader(url)
    reader.read_unit(0, 0)  # the parent has opened zarr (its loop thread is running) before workers fork
    assert pickle.loads(pickle.dumps(reader))._state is None
    loader = torch.utils.data.DataLoader(_UnitDataset(reader), batch_size=None, num_workers=2, timeout=60)
    got = list(loader)
    for i, t in enumerate(got):
        np.testing.assert_array_equal(t.numpy(), expected[(i // 2, i % 2)][1].topk_indices)
