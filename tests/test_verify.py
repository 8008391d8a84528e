"""verify and info on a cache with injected damage: each fault is named with its unit."""

import numpy as np
import pytest
from _fake_cache import write_fake_cache

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.verify import cache_info, verify_cache


@pytest.fixture
def cache(tmp_path):
    url, _ = write_fake_cache(str(tmp_path / "cache.zarr"))
    return url


def _chunk_path(url, array, e, s):
    r = CacheReader(url)
    ndim = 3 + (array != schema.TARGET_LOGPROB)
    return r.objects.path(schema.chunk_key(r.group, array, e, s, ndim))


def test_intact_cache_verifies(cache):
    report = verify_cache(cache)
    assert report.ok, report.problems
    assert report.units_checked == 4


def test_flipped_byte_is_named(cache):
    path = _chunk_path(cache, schema.TOPK_LOGPROBS, 1, 0)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))
    report = verify_cache(cache)
    assert not report.ok
    assert report.bad_units() == [(1, 0)]
    assert "topk_logprobs/c/1/0" in report.problems[0]["what"]


def test_deleted_chunk_is_named_not_read_as_fill(cache):
    import os

    os.remove(_chunk_path(cache, schema.LSE, 0, 1))
    report = verify_cache(cache)
    assert report.bad_units() == [(0, 1)]
    assert "missing" in report.problems[0]["what"]


def test_unfinished_unit_is_reported(cache):
    CacheReader(cache).objects.delete(schema.unit_marker_key("resnet34", 0, 0))
    report = verify_cache(cache)
    assert report.bad_units() == [(0, 0)]
    assert "unfinished" in report.problems[0]["what"]


def test_insane_values_are_reported_even_with_valid_checksums(cache):
    from logitcache.cache.writer import CacheWriter

    r = CacheReader(cache)
    rows = r.read_unit(0, 0)
    rows.topk_logprobs[2, 0] = np.float16(np.nan)
    rows.topk_indices[3, 1] = 500  # C = 100
    w = CacheWriter.open(cache, "resnet34")
    w.write_unit(0, 0, np.arange(len(rows)), rows, len(rows), {})
    whats = [p["what"] for p in verify_cache(cache).problems]
    assert any("non-finite" in w for w in whats) and any("outside [0, 100)" in w for w in whats)


def test_info_reports_groups_and_sizes(cache):
    info = cache_info(cache)
    g = info["groups"]["resnet34"]
    assert g["units_finished"] == g["units_total"] == 4
    assert g["views"] == 20 and g["bytes"] > 0 and g["bytes_per_view"] == pytest.approx(g["bytes"] / 20)
    assert info["root"]["num_classes"] == 100
