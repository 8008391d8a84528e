"""Caches and shards on S3: a real S3 API on loopback (moto's server mode, started and stopped here).

The endpoint reaches s3fs through the environment (``AWS_ENDPOINT_URL_S3``), so plain URLs work everywhere: the
Python API, the CLI and DataLoader workers. Everything is compared with the same operation on local disk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("s3fs", reason="needs the s3 extra (pip install -e '.[dev]')")
pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[dev]')")

from logitcache.cache import schema  # noqa: E402
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ObjectStore  # noqa: E402
from logitcache.cache.verify import cache_info, verify_cache  # noqa: E402
from logitcache.cache.writer import CacheWriter
from logitcache.cli import main  # noqa: E402
from logitcache.dump import DumpConfig, dump  # noqa: E402
from logitcache.errors import CacheError  # noqa: E402

BUCKET = "logitcache-test"
SMALL = dict(teacher="smallcnn", recipe="small", image_size=28, topk=3, epochs=2, progress=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), one bucket, dummy credentials; stopped at the end."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
        # never read this machine's real AWS configuration
        "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
                mp.delenv(k, raising=False)
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(BUCKET)
            yield endpoint
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_endpoint, request):
    """A fresh ``s3://bucket/<test>-<uuid>`` prefix for one test."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _s3fs():
    import fsspec

    return fsspec.filesystem("s3")


def upload(local_dir, url: str) -> str:
    """Copy a local directory's files to an s3:// prefix (like `aws s3 cp --recursive`)."""
    fs = _s3fs()
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url[len('s3://'):]}/{p.relative_to(local_dir).as_posix()}")
    return url


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, small_shards):
    return upload(small_shards, f"s3://{BUCKET}/shared/small_shards")


@pytest.fixture(scope="module")
def local_cache(small_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local_cache") / "cache.zarr")
    dump(DumpConfig(data=str(small_shards), out=out, **SMALL))
    return out


@pytest.fixture(scope="module")
def s3_cache(s3_data):
    """A cache dumped from S3 shards to S3 through the CLI (2 loader workers reading the shards from S3)."""
    out = f"s3://{BUCKET}/shared/cli_cache.zarr"
    result = CliRunner().invoke(main, [
        "dump", "--data", s3_data, "--out", out, "--teacher", "smallcnn", "--recipe", "small", "--image-size", "28",
        "--topk", "3", "--epochs", "2", "--workers", "2", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["units_written"] == 4 and summary["cache"] == out
    return out


def _unit_objects(url: str) -> dict[str, bytes]:
    """Every chunk, pack, marker and unit index object of a cache (the bytes that must not depend on where the
    cache lives)."""
    objects = ObjectStore(url)
    meta = CacheReader(url).meta
    out = {}
    for e in range(SMALL["epochs"]):
        for s in range(2):
            for key in schema.unit_chunk_keys("smallcnn", meta, e, s).values():
                out[key] = objects.get(key)  # None once sealed
    for folder in (schema.UNITS_DIR, schema.UNIT_INDEX_DIR, schema.PACKS_DIR):
        for key in objects.list(f"smallcnn/{folder}"):
            out[key] = objects.get(key)
    return out


# ------------------------------------------------------------------ shards
def test_shards_read_from_s3_equal_local(s3_data, small_shards):
    from logitcache.data.manifest import load_manifest, verify_shards
    from logitcache.data.shards import iter_shard

    local, remote = load_manifest(str(small_shards)), load_manifest(s3_data)
    assert remote.fingerprint == local.fingerprint
    assert remote.shard_url(1) == f"{s3_data}/{local.shards[1].name}"
    assert verify_shards(remote) == []  # sha256 of every object read back from S3
    for a, b in zip(iter_shard(local, 1), iter_shard(remote, 1), strict=True):
        assert (a.key, a.index, a.label) == (b.key, b.index, b.label)
        assert torch.equal(a.image, b.image)


def test_shards_scan_writes_the_manifest_on_s3(s3_prefix, small_shards, tmp_path):
    from logitcache.data.manifest import load_manifest

    fs = _s3fs()
    for p in sorted(small_shards.glob("*.tar")):
        fs.put_file(str(p), f"{s3_prefix[len('s3://'):]}/{p.name}")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(list(load_manifest(str(small_shards)).class_names)))
    r = CliRunner().invoke(main, ["shards", "scan", s3_prefix, "--classes", str(classes), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fingerprint"] == load_manifest(str(small_shards)).fingerprint
    assert load_manifest(s3_prefix).fingerprint == load_manifest(str(small_shards)).fingerprint


# ------------------------------------------------------------------ dump / info / verify
def test_cli_dump_to_s3_equals_local_dump_byte_for_byte(s3_cache, local_cache):
    remote, local = _unit_objects(s3_cache), _unit_objects(local_cache)
    # format 2, sealed: one pack and one pack index per epoch; no chunk object, no marker left
    assert sorted(k.split("/")[1] for k, v in remote.items() if v is not None) == [schema.PACKS_DIR] * 2 + [
        schema.UNIT_INDEX_DIR] * 2
    assert remote == local


def test_python_api_dump_s3_to_s3_resumes_like_local(s3_data, s3_prefix, local_cache):
    out = f"{s3_prefix}/cache.zarr"
    first = dump(DumpConfig(data=s3_data, out=out, shards=(1,), **SMALL))
    assert first.units_written == 2
    assert sorted(CacheReader(out).markers()) == [(0, 1), (1, 1)]
    rest = dump(DumpConfig(data=s3_data, out=out, **SMALL))  # finishes shard 0 only
    assert (rest.units_written, rest.units_skipped_done) == (2, 2)
    assert _unit_objects(out) == _unit_objects(local_cache)


def test_info_and_verify_on_s3(s3_cache, s3_data):
    info = cache_info(s3_cache)
    g = info["groups"]["smallcnn"]
    assert g["units_finished"] == g["units_total"] == 4 and g["views"] == 48 and g["bytes"] > 0
    assert info["root"]["dataset_fingerprint"] == json.loads(ObjectStore(s3_data).get("manifest.json"))["fingerprint"]
    report = verify_cache(s3_cache, data=s3_data)
    assert report.ok, report.problems
    assert report.units_checked == 4

    runner = CliRunner()
    r = runner.invoke(main, ["info", s3_cache, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["groups"]["smallcnn"]["k"] == 3
    r = runner.invoke(main, ["verify", s3_cache, "--data", s3_data, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] is True


def test_verify_names_a_damaged_chunk_on_s3(s3_data, s3_prefix, local_cache):
    """On S3, a flipped byte inside a sealed pack damages the unit whose range holds it (read with one ranged
    GET), and a deleted pack the units of its epoch."""
    out = f"{s3_prefix}/cache.zarr"
    fs = _s3fs()
    fs.put(local_cache, out[len("s3://"):], recursive=True)  # a copy of the local cache, damaged below
    assert verify_cache(out).ok
    reader = CacheReader(local_cache)
    flipped, deleted = reader.unit_marker(1, 0).pack, reader.unit_marker(0, 1).pack
    flipped_key = schema.pack_key("smallcnn", 1, flipped.pack_id)
    deleted_key = schema.pack_key("smallcnn", 0, deleted.pack_id)
    bucket_path = out[len("s3://"):]
    data = bytearray(fs.cat_file(f"{bucket_path}/{flipped_key}"))
    data[flipped.offset + flipped.length // 2] ^= 0x01
    fs.pipe_file(f"{bucket_path}/{flipped_key}", bytes(data))
    fs.rm_file(f"{bucket_path}/{deleted_key}")
    report = verify_cache(out)
    assert report.bad_units() == [(0, 0), (0, 1), (1, 0)]
    whats = " ".join(p["what"] for p in report.problems)
    assert f"pack {flipped_key} bytes [{flipped.offset}, " in whats and "differs" in whats
    assert f"pack {deleted_key} is missing" in whats
    r = CliRunner().invoke(main, ["verify", out])
    assert r.exit_code != 0 and "FAILED" in r.output and flipped_key in r.output


# ------------------------------------------------------------------ reading: workers, concurrent writer
class _RowsDataset(torch.utils.data.Dataset):
    """Each item: the cached rows of one sample (cache epoch 1), read in whichever process asks."""

    def __init__(self, reader: CacheReader, n: int):
        self.reader, self.n = reader, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tk, views = self.reader.rows(1, [i], targets=[0])
        return i, tk.indices[0], tk.logits[0], torch.from_numpy(views[0].astype(np.int64))


def test_reader_in_dataloader_workers_reads_s3(s3_cache, local_cache):
    reader = CacheReader(s3_cache)
    reader.rows(0, [0], targets=[0])  # the parent touches zarr/s3fs before forking: workers must reopen
    loader = torch.utils.data.DataLoader(_RowsDataset(reader, 24), batch_size=5, num_workers=2)
    got = {int(i): (idx, lg, v) for b in loader for i, idx, lg, v in zip(*b, strict=True)}
    assert sorted(got) == list(range(24))
    expected_tk, expected_views = CacheReader(local_cache).rows(1, np.arange(24), targets=np.zeros(24))
    for i, (idx, lg, v) in got.items():
        assert torch.equal(idx, expected_tk.indices[i])
        assert torch.equal(lg, expected_tk.logits[i])
        assert torch.equal(v, torch.from_numpy(expected_views[i].astype(np.int64)))


def test_reader_never_sees_a_half_written_unit(s3_prefix):
    """The marker is written last: while a unit's chunks exist but its marker does not, readers (one opened
    before, one opened during the write) and verify call the unit unfinished; once the marker lands, it reads."""
    from _fake_cache import SHARD_LENGTHS, _metas, _unit

    url = f"{s3_prefix}/cache.zarr"
    root, meta = _metas()
    writer = CacheWriter.create_or_open(url, "resnet34", meta, root, {})
    for e, s in [(0, 0), (0, 1), (1, 0)]:
        writer.write_unit(e, s, np.arange(SHARD_LENGTHS[s]), _unit(e, s, SHARD_LENGTHS[s])[1], SHARD_LENGTHS[s], {})
    # its own s3fs instance, as in another process: its listings are cached apart from the writer's
    early = CacheReader(url, storage_options={"skip_instance_cache": True})
    assert sorted(early.markers()) == [(0, 0), (0, 1), (1, 0)]

    marker_key = schema.unit_marker_key("resnet34", 1, 1)
    chunks_written, release = threading.Event(), threading.Event()
    real_put = writer.objects.put

    def put_marker_later(key, data):
        if key == marker_key:
            chunks_written.set()
            assert release.wait(30), "the test never released the marker write"
        real_put(key, data)

    writer.objects.put = put_marker_later
    n = SHARD_LENGTHS[1]
    rows = _unit(1, 1, n)[1]
    t = threading.Thread(target=writer.write_unit, args=(1, 1, np.arange(n), rows, n, {}))
    t.start()
    try:
        assert chunks_written.wait(30)
        objects = ObjectStore(url)
        assert all(objects.exists(schema.chunk_key("resnet34", a.name, 1, 1, 3 + (a.trailing != "")))
                   for a in schema.ARRAYS)
        assert not objects.exists(marker_key)
        for reader in (early, CacheReader(url)):
            with pytest.raises(CacheError, match=r"unit \(epoch 1, shard 1\) is unfinished"):
                reader.read_unit(1, 1)
        assert verify_cache(url).bad_units() == [(1, 1)]
    finally:
        release.set()
        t.join(30)
    np.testing.assert_array_equal(early.read_unit(1, 1).topk_indices, rows.topk_indices)
    assert verify_cache(url).ok


# ------------------------------------------------------------------ training from S3
def test_train_from_s3_cache_and_s3_shards(s3_cache, s3_data, tmp_path):
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(main, [
        "train", "--cache", s3_cache, "--data", s3_data, "--val", s3_data, "--student", "smallcnn",
        "--loss", "kd", "--recipe", "small", "--image-size", "28", "--epochs", "1", "--batch-size", "8",
        "--out", str(run_dir), "--workers", "2",
    ])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and lines[-1]["epoch"] == 0 and np.isfinite(lines[-1]["train"]["loss"])
    assert (run_dir / "checkpoints" / "last.pt").exists()


def test_local_copy_of_s3_cache_verifies(s3_cache, tmp_path):
    """Download with plain fsspec: a cache is a tree of plain objects, nothing location-dependent inside."""
    dest = tmp_path / "copy.zarr"
    _s3fs().get(s3_cache[len("s3://"):], str(dest), recursive=True)
    assert verify_cache(str(dest)).ok
    shutil.rmtree(dest / "smallcnn" / "unit_index")  # the sealed units' only records
    assert not (dest / "smallcnn" / "units").exists()
    assert len(verify_cache(str(dest)).bad_units()) == 4


def test_scan_a_brace_pattern_of_gzipped_shards_on_s3(s3_prefix, small_shards, tmp_path):
    """`shards scan 's3://.../shard-{000000..000001}.tar.gz'`: webdataset's brace expansion, fsspec reads, gzip."""
    import gzip

    from logitcache.data.manifest import load_manifest
    from logitcache.data.shards import iter_shard

    fs = _s3fs()
    local = load_manifest(str(small_shards))
    for p in sorted(small_shards.glob("*.tar")):
        with fs.open(f"{s3_prefix[len('s3://'):]}/{p.name}.gz", "wb") as f:
            f.write(gzip.compress(p.read_bytes(), mtime=0))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(list(local.class_names)))
    pattern = f"{s3_prefix}/shard-{{000000..{len(local.shards) - 1:06d}}}.tar.gz"
    r = CliRunner().invoke(main, ["shards", "scan", pattern, "--classes", str(classes), "--json"])
    assert r.exit_code == 0, r.output
    m = load_manifest(s3_prefix)
    assert [s.name for s in m.shards] == [f"{s.name}.gz" for s in local.shards]
    assert [s.keys_digest for s in m.shards] == [s.keys_digest for s in local.shards]
    got = [(s.index, s.label) for i in range(len(m.shards)) for s in iter_shard(m, i)]
    assert got == [(s.index, s.label) for i in range(len(local.shards)) for s in iter_shard(local, i)]


# ------------------------------------------------------------------ bounded reads (tests/test_hostile_sizes.py)
def test_objects_over_their_cap_are_refused_on_s3_with_a_ranged_read(s3_prefix, s3_data, monkeypatch):
    """On S3 a capped read is one ranged GET of cap + 1 bytes (get and the batched get_many alike): an object
    over the cap is refused naming it, never fetched whole; an empty object (no byte 0 to range over) reads."""
    from logitcache.data import manifest as manifest_module
    from logitcache.data.manifest import load_manifest
    from logitcache.errors import CacheMetadataError, ManifestError

    objects = ObjectStore(s3_prefix)
    objects.put("big.json", b"x" * 1000)
    objects.put("small.json", b"y" * 10)
    objects.put("empty.json", b"")
    ends = []
    cat_file, cat_ranges = objects.fs.cat_file, objects.fs.cat_ranges
    monkeypatch.setattr(objects.fs, "cat_file", lambda p, start=None, end=None, **k: (
        ends.append(end), cat_file(p, start=start, end=end, **k))[1])
    monkeypatch.setattr(objects.fs, "cat_ranges", lambda paths, starts, e, **k: (
        ends.append(e), cat_ranges(paths, starts, e, **k))[1])

    with pytest.raises(CacheMetadataError) as err:
        objects.get("big.json", max_bytes=100, what="test object")
    assert "big.json" in str(err.value) and "over 100 bytes" in str(err.value) and ends == [101]
    assert objects.get("small.json", max_bytes=100) == b"y" * 10
    assert objects.get("empty.json", max_bytes=100) == b""
    assert objects.get("missing.json", max_bytes=100) is None
    assert objects.get_many(["small.json", "empty.json", "missing.json"], max_bytes=100) == {
        "small.json": b"y" * 10, "empty.json": b""}
    with pytest.raises(CacheMetadataError, match="big.json"):
        objects.get_many(["small.json", "big.json"], max_bytes=100)
    assert set(ends) == {101} and objects.get("big.json") == b"x" * 1000  # uncapped reads (chunks) unchanged

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError) as err:
        load_manifest(s3_data)
    assert f"{s3_data}/manifest.json" in str(err.value) and "100 bytes" in str(err.value)
