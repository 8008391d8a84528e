"""Every JSON object logitcache reads has a size cap (`runtime.bounded`, the caps in `cache.schema` and there): an
object over it is refused with the reader's own error, naming the object, its size and the cap, before it is read.

The oversized objects are sparse files of 1 TiB (no disk used): a reader that read one would die of MemoryError
(or take minutes) instead of raising the error these tests expect. The S3 path is in tests/test_remote.py.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil

import pytest
import torch
from _fake_cache import write_fake_cache
from click.testing import CliRunner

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ObjectStore, read_markers, write_unit_indexes
from logitcache.cli import main
from logitcache.data.convert.scan import expand_sources, read_class_names
from logitcache.data.decode import decode_sample
from logitcache.data.manifest import load_manifest
from logitcache.errors import (
    BadSampleError,
    CacheMetadataError,
    DataError,
    LogitcacheError,
    ManifestError,
    RunError,
)
from logitcache.eval.plots import read_metrics, read_reliability
from logitcache.runtime import bounded
from logitcache.train.checkpoint import stored_json
from logitcache.train.rundir import RunDir

TIB = 1 << 40
GROUP = "resnet34"


def grow(path: pathlib.Path, size: int = TIB) -> pathlib.Path:
    """Make ``path`` ``size`` bytes long (sparse: its JSON, then zeros), creating it when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.truncate(size)
    return path


def assert_names(err: Exception, *names) -> None:
    for n in names:
        assert str(n) in str(err), f"{n!r} not in: {err}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> pathlib.Path:
    url, _ = write_fake_cache(str(tmp_path_factory.mktemp("sizes") / "cache.zarr"))
    write_unit_indexes(ObjectStore(url), GROUP)  # its epochs' unit indexes too (markers kept: not sealed)
    return pathlib.Path(url)


@pytest.fixture
def cache(clean, tmp_path) -> pathlib.Path:
    out = tmp_path / "cache.zarr"
    shutil.copytree(clean, out)
    return out


# ------------------------------------------------------------------ the cache's objects
CACHE_OBJECTS = [  # (key, what it is, the cap, how a reader gets to it)
    ("zarr.json", "zarr.json", schema.MAX_METADATA_JSON_BYTES, lambda r: r.meta),
    (f"{GROUP}/zarr.json", "zarr.json", schema.MAX_METADATA_JSON_BYTES, lambda r: r.meta),
    (f"{GROUP}/topk_indices/zarr.json", "zarr.json", schema.MAX_METADATA_JSON_BYTES, lambda r: r.meta),
    (f"{GROUP}/runs/20260101T000000-0.json", "run record", schema.MAX_METADATA_JSON_BYTES, lambda r: r.meta),
    (f"{GROUP}/units/e00000-s000001.json", "unit marker", schema.MAX_MARKER_BYTES, lambda r: r.markers()),
    (f"{GROUP}/unit_index/e00001.json", "unit index", schema.MAX_UNIT_INDEX_BYTES, lambda r: r.markers()),
    ("dataset_manifest.json", "dataset manifest", schema.MAX_MANIFEST_BYTES, lambda r: r.manifest_json()),
]


@pytest.mark.parametrize("key,what,cap,read", CACHE_OBJECTS, ids=[c[0] for c in CACHE_OBJECTS])
def test_oversized_cache_object_is_refused_naming_it(cache, key, what, cap, read):
    grow(cache / key)
    with pytest.raises(CacheMetadataError) as e:
        read(CacheReader(str(cache), GROUP))
    assert_names(e.value, key, f"{TIB:,} bytes", f"{cap:,} bytes", what)


def test_objects_within_their_caps_read_as_before(cache):
    r = CacheReader(str(cache), GROUP)
    assert len(r.markers()) == 4 and r.manifest_json() == {"fingerprint": "a" * 64}


def test_a_marker_one_byte_over_its_cap_is_refused_one_byte_under_is_read(cache, monkeypatch):
    """The cap is exact: the marker's own size is accepted, one byte less is refused (monkeypatched cap)."""
    from logitcache.cache import store

    marker = cache / GROUP / "units" / "e00000-s000000.json"
    size = marker.stat().st_size
    monkeypatch.setitem(store.MARKER, "max_bytes", size)
    assert (0, 0) in read_markers(ObjectStore(str(cache)), GROUP)
    monkeypatch.setitem(store.MARKER, "max_bytes", size - 1)
    with pytest.raises(CacheMetadataError) as e:
        read_markers(ObjectStore(str(cache)), GROUP)
    assert_names(e.value, "units/e00000-s000000.json", f"{size:,} bytes", f"{size - 1:,} bytes")


def test_a_unit_index_over_its_cap_is_not_written_markers_stay(cache, monkeypatch):
    """A dump never writes an index its readers would refuse: the epoch keeps its marker objects."""
    from logitcache.cache import store

    shutil.rmtree(cache / GROUP / "unit_index")
    monkeypatch.setitem(store.UNIT_INDEX, "max_bytes", 64)
    objects = ObjectStore(str(cache))
    assert write_unit_indexes(objects, GROUP) == []
    assert not (cache / GROUP / "unit_index").exists() and len(read_markers(objects, GROUP)) == 4


def test_cli_info_on_an_oversized_zarr_json_is_a_clean_error(cache):
    grow(cache / "zarr.json")
    r = CliRunner().invoke(main, ["info", str(cache)])
    assert r.exit_code == 1 and not isinstance(r.exception, MemoryError), r.output
    assert "Traceback" not in r.output
    assert_names(r.output, "zarr.json", f"{TIB:,} bytes", f"{schema.MAX_METADATA_JSON_BYTES:,} bytes")


# ------------------------------------------------------------------ manifests, samples, class names
def test_oversized_manifest_is_refused(tmp_path):
    path = grow(tmp_path / "manifest.json")
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    assert_names(e.value, path, f"{TIB:,} bytes", f"{schema.MAX_MANIFEST_BYTES:,} bytes")


def test_manifest_too_big_for_its_readers_is_not_written(small_shards, tmp_path, monkeypatch):
    from logitcache.data import manifest as manifest_module

    m = load_manifest(small_shards)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError, match="no reader would open it"):
        m.save(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_oversized_sample_json_is_a_bad_sample_not_parsed(monkeypatch):
    """The member is in memory already (a tar member); the cap keeps its parse (many times its size) bounded."""
    from logitcache.data import decode

    data = json.dumps({"label": 1, "pad": "x" * 100}).encode()
    monkeypatch.setattr(decode, "MAX_SAMPLE_JSON_BYTES", len(data) - 1)
    monkeypatch.setattr(decode.json, "loads", lambda *a, **k: pytest.fail("parsed an oversized .json"))
    raw = {"__url__": "shard-0.tar", "__key__": "k7", "json": data, "png": b""}
    with pytest.raises(BadSampleError) as e:
        decode_sample(raw, 10, label_key="label")
    assert_names(e.value, "shard-0.tar:k7", ".json", f"{len(data):,} bytes", f"{len(data) - 1:,} bytes")


def test_oversized_class_names_file_is_refused(tmp_path):
    path = grow(tmp_path / "classes.json")
    with pytest.raises(DataError) as e:
        read_class_names(str(path))
    assert_names(e.value, path, f"{TIB:,} bytes", f"{schema.MAX_CLASS_NAMES_BYTES:,} bytes")


def test_oversized_or_binary_url_list_is_refused(tmp_path):
    path = grow(tmp_path / "shards.txt")
    with pytest.raises(DataError) as e:
        expand_sources(str(path))
    assert_names(e.value, path, f"{TIB:,} bytes", f"{schema.MAX_URL_LIST_BYTES:,} bytes")
    res = CliRunner().invoke(main, ["shards", "scan", str(path), "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "URL list file" in res.output and "Traceback" not in res.output
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"shard-0.tar\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        expand_sources(str(binary))
    ok = tmp_path / "ok.txt"
    ok.write_text("# two shards\nshard-0.tar\n\ns3://bucket/shard-1.tar\n")
    assert expand_sources(str(ok)) == [str(tmp_path / "shard-0.tar"), "s3://bucket/shard-1.tar"]


# ------------------------------------------------------------------ run directories and checkpoints
def test_oversized_run_files_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    grow(run / "metrics.jsonl")
    grow(run / "val_reliability.json")
    grow(run / "config.json")
    with pytest.raises(RunError) as e:
        read_metrics(run)
    assert_names(e.value, "metrics.jsonl", f"{TIB:,} bytes", f"{bounded.MAX_METRICS_LOG_BYTES:,} bytes")
    with pytest.raises(RunError) as e:
        read_reliability(run)
    assert_names(e.value, "val_reliability.json", f"{bounded.MAX_RUN_JSON_BYTES:,} bytes")
    with pytest.raises(RunError) as e:
        RunDir(str(run)).metrics()
    assert_names(e.value, "metrics.jsonl", f"{TIB:,} bytes")
    with pytest.raises(RunError) as e:
        RunDir(str(run)).read_json("config.json")
    assert_names(e.value, "config.json", f"{TIB:,} bytes")


def test_checkpoint_json_entries_are_capped(monkeypatch):
    from logitcache.train import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_RUN_JSON_BYTES", 10)
    monkeypatch.setattr(checkpoint.json, "loads", lambda *a, **k: pytest.fail("parsed an oversized entry"))
    with pytest.raises(LogitcacheError) as e:
        stored_json({"config": json.dumps({"a": "x" * 20})}, "config", "run/checkpoints/last.pt")
    assert_names(e.value, "run/checkpoints/last.pt", "'config'", "29 bytes", "10 bytes")
    with pytest.raises(LogitcacheError, match="not JSON text"):
        stored_json({"config": torch.zeros(3)}, "config", "last.pt")


def test_eval_refuses_an_oversized_stored_config(monkeypatch):
    evaluate = importlib.import_module("logitcache.eval.evaluate")  # (the package exports a function of that name)
    monkeypatch.setattr(evaluate, "MAX_RUN_JSON_BYTES", 10)
    with pytest.raises(LogitcacheError) as e:
        evaluate.checkpoint_config({"config": json.dumps({"a": "x" * 20})}, "student.pt")
    assert_names(e.value, "student.pt", "29 bytes", "10 bytes")
    assert evaluate.checkpoint_config({"config": "{}"}, "student.pt") == {}


# ------------------------------------------------------------------ the one bounded read
def test_read_bounded_reads_no_more_than_the_cap_from_a_file_that_grows(tmp_path, monkeypatch):
    """The size is checked at open; a file appended to after that is still read at most cap + 1 bytes."""
    import fsspec

    path = tmp_path / "grows.json"
    path.write_bytes(b"x" * 10)
    real_fstat = bounded.os.fstat

    def fstat_then_grow(fd):  # the size as it was at open; the file then grows to 1 GiB
        st = real_fstat(fd)
        if st.st_size == 10:
            grow(path, 1 << 30)
        return st

    monkeypatch.setattr(bounded.os, "fstat", fstat_then_grow)
    fs = fsspec.filesystem("file")
    with pytest.raises(ValueError, match="over 100 bytes"):
        bounded.read_bounded(fs, str(path), 100, name=str(path), what="test object", error=ValueError)
    path.write_bytes(b"y" * 50)
    assert bounded.read_bounded(fs, str(path), 100, name="p", what="t", error=ValueError) == b"y" * 50
    with pytest.raises(FileNotFoundError):
        bounded.read_bounded(fs, str(tmp_path / "none"), 100, name="p", what="t", error=ValueError)
