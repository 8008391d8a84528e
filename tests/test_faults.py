"""Faults that must lose nothing: disk full / permission denied while dumping, damage found after the fact,
shards changed since the dump.

Tests run as root, where chmod denies nothing (CONTRACTS §7), so write faults are injected: a ``faulty://``
fsspec filesystem (the local disk, through the same remote-store code path as ``s3://``) whose n-th matching
write raises, and for the plain-path case a wrapper around zarr's LocalStore.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import tarfile
from typing import ClassVar

import fsspec
import pytest
from _cache_edit import flip_unit_byte, unseal
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import unfinish_units
from logitcache.cache.verify import verify_cache
from logitcache.cli import main
from logitcache.dump import DumpConfig, dump
from logitcache.errors import CacheWriteError, LogitcacheError, ShardChangedError

SMALL = dict(teacher="smallcnn", recipe="small", image_size=28, topk=3, epochs=2, progress=False)
UNITS = [(e, s) for e in range(2) for s in range(2)]


# ------------------------------------------------------------------ fault injection
@dataclasses.dataclass
class WriteFault:
    """Raise ``error`` at the ``nth`` write (1-based) to a path matching ``pattern``; count every match."""

    pattern: str
    nth: int
    error: OSError
    seen: int = 0
    raised: str | None = None  # the path it failed

    def check(self, path: str) -> None:
        if re.search(self.pattern, path):
            self.seen += 1
            if self.seen == self.nth:
                self.raised = path
                raise self.error


class FaultyFileSystem(LocalFileSystem):
    """``faulty:///abs/path``: the local disk, with `fault` applied to every write (open for writing)."""

    protocol = "faulty"
    fault: ClassVar[WriteFault | None] = None

    def __init__(self, *args, **kwargs):
        kwargs.pop("asynchronous", None)  # zarr asks for an async filesystem and wraps a sync one itself
        super().__init__(auto_mkdir=True)

    def _open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wax") and FaultyFileSystem.fault is not None:
            FaultyFileSystem.fault.check(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def faulty():
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    FaultyFileSystem.clear_instance_cache()
    yield FaultyFileSystem
    FaultyFileSystem.fault = None
    FaultyFileSystem.clear_instance_cache()


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def clean_cache(small_shards, tmp_path_factory):
    """An undamaged dump: the reference every faulted/repaired cache must equal byte for byte."""
    out = str(tmp_path_factory.mktemp("clean") / "cache.zarr")
    dump(DumpConfig(data=str(small_shards), out=out, **SMALL))
    return out


def unit_objects(url: str) -> dict[str, bytes]:
    """All chunk objects, packs, markers and unit indexes (the bytes that define the cached views and record
    them), by key."""
    base = url.split("://", 1)[-1]
    out = {}
    for root, _, files in os.walk(base):
        for f in files:
            key = os.path.relpath(os.path.join(root, f), base)
            if "/c/" in key or "/c." in key or any(f"/{d}/" in key for d in (schema.UNITS_DIR, schema.UNIT_INDEX_DIR,
                                                                                 schema.PACKS_DIR)):
                with open(os.path.join(root, f), "rb") as fh:
                    out[key] = fh.read()
    return out


def chunk_path(url: str, e: int, s: int) -> str:
    """The one stored chunk of unit (e, s) (format 2, what dump writes)."""
    return os.path.join(url, schema.unit_chunk_keys("smallcnn", CacheReader(url).meta, e, s)[schema.ROWS])


def assert_finished_units_intact(url: str, n_finished: int) -> None:
    """Exactly ``n_finished`` units have markers and every problem verify finds is an unfinished unit."""
    markers = CacheReader(url).markers(refresh=True)
    assert len(markers) == n_finished
    report = verify_cache(url)
    assert report.units_checked == n_finished
    assert all("unfinished" in p["what"] for p in report.problems), report.problems
    assert sorted(report.bad_units()) == sorted(set(UNITS) - set(markers))


# ------------------------------------------------------------------ disk full / permission denied
@pytest.mark.parametrize(
    "pattern, nth, error, what",
    [
        # the 3rd unit's chunk (one per unit in format 2): two units finished before
        (r"/rows/c\.", 3, OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        # the 3rd unit's marker: all its chunks are on disk, the unit is still unfinished
        (r"/units/", 3, PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    ],
    ids=["enospc-chunk", "eacces-marker"],
)
def test_write_fault_is_named_and_finished_units_stay_valid(
    faulty, small_shards, tmp_path, clean_cache, pattern, nth, error, what
):
    out = tmp_path / "cache.zarr"
    faulty.fault = WriteFault(pattern, nth, error)
    with pytest.raises(CacheWriteError) as exc:
        dump(DumpConfig(data=str(small_shards), out=f"faulty://{out}", **SMALL))
    msg = str(exc.value)
    failed_key = faulty.fault.raised[len(str(out)) + 1:]
    assert re.search(r"unit \(epoch \d, shard \d\)", msg) and failed_key in msg and what in msg, msg
    assert isinstance(exc.value.__cause__, type(error))
    faulty.fault = None

    assert_finished_units_intact(str(out), 2)
    rest = dump(DumpConfig(data=str(small_shards), out=str(out), **SMALL))  # the plain path: same store
    assert (rest.units_written, rest.units_skipped_done) == (2, 2)
    assert verify_cache(str(out)).ok
    assert unit_objects(str(out)) == unit_objects(clean_cache)


def test_disk_full_on_a_plain_path_via_the_cli(small_shards, tmp_path, clean_cache, monkeypatch):
    """The local store (zarr's LocalStore + our atomic marker write), a fault at the 2nd chunk write, seen
    through the CLI: a one-line error, non-zero exit; a rerun completes the cache."""
    import zarr.storage

    fault = WriteFault(r"/rows/c\.", 2, OSError(errno.ENOSPC, "No space left on device"))
    real_set = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        fault.check(key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    out = str(tmp_path / "cache.zarr")
    args = ["dump", "--data", str(small_shards), "--out", out, "--teacher", "smallcnn", "--recipe", "small",
            "--image-size", "28", "--topk", "3", "--epochs", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "CacheWriteError" in r.output and "no space left on the device" in r.output
    assert "Traceback" not in r.output
    assert f"{fault.raised}" in r.output
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)

    assert_finished_units_intact(out, 1)
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["units_written"] == 3
    assert unit_objects(out) == unit_objects(clean_cache)


def test_fault_while_creating_the_cache_is_a_clear_error(faulty, small_shards, tmp_path):
    out = tmp_path / "cache.zarr"
    faulty.fault = WriteFault(r"zarr\.json$", 1, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(CacheWriteError, match=r"cannot create or extend teacher group 'smallcnn'.*permission denied"):
        dump(DumpConfig(data=str(small_shards), out=f"faulty://{out}", **SMALL))


# ------------------------------------------------------------------ damage after the fact, then --repair
def test_damaged_chunks_are_named_and_repair_redoes_exactly_them(small_shards, tmp_path, clean_cache):
    """Units finished but not sealed (a dump stopped before its end: a chunk object and a marker each): a
    deleted and a flipped chunk object are named; the repair redoes those two units and seals the epochs into
    the clean cache's packs. (Damage inside a pack: tests/test_packs.py.)"""
    out = str(tmp_path / "cache.zarr")
    shutil.copytree(clean_cache, out)
    unseal(out, "smallcnn")
    os.remove(chunk_path(out, 0, 1))  # deleted: would read back as fill values
    flip_unit_byte(out, "smallcnn", 1, 0)

    r = CliRunner().invoke(main, ["verify", out, "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["bad_units"] == [[0, 1], [1, 0]]
    named = " ".join(p["what"] for p in report["problems"])
    assert "smallcnn/rows/c.0.1.0.0 is missing" in named
    assert "smallcnn/rows/c.1.0.0.0 differs" in named

    r = CliRunner().invoke(main, ["dump", "--data", str(small_shards), "--out", out, "--teacher", "smallcnn",
                                  "--recipe", "small", "--image-size", "28", "--topk", "3", "--epochs", "2",
                                  "--repair", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["units_written"], summary["units_skipped_done"]) == (2, 2)  # the undamaged units not redone
    assert verify_cache(out).ok
    assert unit_objects(out) == unit_objects(clean_cache)


# ------------------------------------------------------------------ shards changed since the dump
def _members(path) -> list[tuple[str, dict[str, bytes]]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.items())


def _reencode_png(data: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.save(buf, format="PNG", compress_level=0)  # the same pixels, other bytes
    return buf.getvalue()


def _rewrite_shard(data_dir, shard_name: str, samples, tmp_path) -> None:
    """Replace one shard file in ``data_dir`` by ``samples`` (the manifest stays the old one)."""
    from logitcache.data.manifest import load_manifest
    from logitcache.data.write import write_shards

    staging = tmp_path / f"staging-{shard_name}"
    write_shards(samples, staging, class_names=load_manifest(str(data_dir)).class_names,
                 samples_per_shard=len(samples))
    shutil.copyfile(staging / "shard-000000.tar", data_dir / shard_name)


@pytest.fixture
def changed_data(small_shards, tmp_path):
    """A copy of the data with shard 1 re-encoded (same keys) and one sample removed from shard 0, under the
    old manifest; plus ``rescanned``: the same changed shards under a freshly scanned manifest."""
    from logitcache.data.convert.scan import build_manifest, list_shards
    from logitcache.data.manifest import load_manifest

    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    m = load_manifest(str(data))
    names = [s.name for s in m.shards]
    s1 = _members(data / names[1])
    s1[3] = (s1[3][0], {**s1[3][1], "png": _reencode_png(s1[3][1]["png"])})
    _rewrite_shard(data, names[1], s1, tmp_path)
    s0 = _members(data / names[0])
    _rewrite_shard(data, names[0], s0[:5] + s0[6:], tmp_path)
    rescanned = tmp_path / "rescanned"
    shutil.copytree(data, rescanned)
    os.remove(rescanned / "manifest.json")
    build_manifest(list_shards(str(rescanned)), m.class_names).save(str(rescanned))
    return data, rescanned, names


def test_verify_data_names_changed_shards(clean_cache, changed_data):
    data, rescanned, names = changed_data
    for d in (data, rescanned):
        r = CliRunner().invoke(main, ["verify", clean_cache, "--data", str(d), "--json"])
        assert r.exit_code == 1
        where_what = " ".join(f"{p['where']} {p['what']}" for p in json.loads(r.stdout)["problems"])
        assert names[0] in where_what and names[1] in where_what, where_what


def test_dump_on_changed_shards_refuses_naming_the_shard(clean_cache, changed_data, tmp_path):
    data, rescanned, names = changed_data
    out = str(tmp_path / "cache.zarr")
    shutil.copytree(clean_cache, out)
    unfinish_units(CacheReader(out).objects, "smallcnn", [(1, 0)])  # shard 0 must be read again
    # the old manifest: reading the changed shard stops at its first check (size at open)
    with pytest.raises(ShardChangedError, match=re.escape(names[0])):
        dump(DumpConfig(data=str(data), out=out, **SMALL))
    # a new manifest: the cache was made from other data
    with pytest.raises(LogitcacheError, match="other data"):
        dump(DumpConfig(data=str(rescanned), out=out, **SMALL))
    assert verify_cache(out).bad_units() == [(1, 0)]  # nothing else was touched
    clean = CacheReader(clean_cache).markers(refresh=True)
    assert CacheReader(out).markers(refresh=True) == {u: m for u, m in clean.items() if u != (1, 0)}
    def others(url):  # epoch 1's index was rewritten without the unit (compared above, as records)
        return {k: v for k, v in unit_objects(url).items() if "e00001" not in k}

    assert others(out) == others(clean_cache)


def test_training_on_changed_shards_refuses_naming_the_shard(clean_cache, changed_data, tmp_path):
    data, rescanned, names = changed_data
    # under a rescanned manifest both changed shards are named (the fingerprint covers sha256 and keys); under
    # the old manifest the shard that lost a sample fails its cheap check (size / keys) when it is read
    for d, expected in ((rescanned, names), (data, names[:1])):
        r = CliRunner().invoke(main, [
            "train", "--cache", clean_cache, "--data", str(d), "--student", "smallcnn", "--loss", "kd",
            "--recipe", "small", "--image-size", "28", "--epochs", "1", "--batch-size", "8",
            "--out", str(tmp_path / f"run-{d.name}"),
        ])
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.output
        assert all(name in r.output for name in expected), r.output


def test_unchanged_copy_of_the_data_still_verifies(clean_cache, small_shards, tmp_path):
    """Control for the two tests above: a byte-identical copy elsewhere is the same data."""
    data = tmp_path / "copy"
    shutil.copytree(small_shards, data)
    assert verify_cache(clean_cache, data=str(data)).ok
