"""The manifest: facts per shard, the fingerprint, loading from paths/URLs, cheap and full shard checks."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from _data_helpers import imagenet_like_samples

from logitcache.data.convert.scan import build_manifest, list_shards, scan_shard
from logitcache.data.manifest import Manifest, ShardCheck, keys_digest, load_manifest, verify_shards
from logitcache.data.shards import iter_shard
from logitcache.data.split import parse_shard_selection
from logitcache.data.write import write_shards
from logitcache.errors import ManifestError, ShardChangedError, ShardSelectionError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def test_manifest_records_the_facts_of_each_shard(imagenet_shards):
    m = load_manifest(imagenet_shards)
    assert m.num_classes == 1000 and m.class_names[3] == "n00000003"
    assert [s.num_samples for s in m.shards] == [8, 8, 8] and [s.first_index for s in m.shards] == [0, 8, 16]
    for i, s in enumerate(m.shards):
        data = (imagenet_shards / s.name).read_bytes()
        assert s.size == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()
        assert m.shard_url(i) == str(imagenet_shards / s.name)
        assert s.keys_digest == keys_digest(x.key for x in iter_shard(m, i))
    assert m.locate(0) == (0, 0) and m.locate(8) == (1, 0) and m.locate(23) == (2, 7)
    with pytest.raises(IndexError):
        m.locate(24)


def test_load_from_directory_file_and_url(imagenet_shards):
    a = load_manifest(imagenet_shards)
    b = load_manifest(imagenet_shards / "manifest.json")
    c = load_manifest(f"file://{imagenet_shards}")
    assert a == b == c and a.fingerprint == b.fingerprint == c.fingerprint
    assert c.shard_url(1).startswith("file://")
    assert [x.index for x in iter_shard(c, 1)] == list(range(8, 16))


def test_json_round_trip_and_fingerprint_definition(imagenet_shards):
    m = load_manifest(imagenet_shards)
    d = json.loads(json.dumps(m.to_json()))
    assert Manifest.from_json(d) == m and Manifest.from_json(d).fingerprint == m.fingerprint
    ident = {k: v for k, v in d.items() if k != "fingerprint"}
    canonical = json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert m.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
    renamed = Manifest(m.shards, ("x",) + m.class_names[1:])
    assert renamed.fingerprint != m.fingerprint


def test_edited_or_malformed_manifests_are_refused(imagenet_shards, tmp_path):
    d = load_manifest(imagenet_shards).to_json()
    d["shards"][1]["num_samples"] = 9
    with pytest.raises(ManifestError):  # first_index no longer adds up, or the fingerprint no longer matches
        Manifest.from_json(d)
    d = load_manifest(imagenet_shards).to_json()
    d["class_names"][0] = "cat"
    with pytest.raises(ManifestError, match="edited"):
        Manifest.from_json(d)
    with pytest.raises(ManifestError, match="not a logitcache manifest"):
        Manifest.from_json({"format": "other"})
    with pytest.raises(ManifestError, match="no manifest here"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_scanning_shards_someone_else_made_gives_the_same_manifest(imagenet_shards, tmp_path):
    for p in imagenet_shards.glob("*.tar"):
        shutil.copy(p, tmp_path / p.name)
    urls = list_shards(tmp_path)
    assert [u.rsplit("/", 1)[1] for u in urls] == sorted(p.name for p in imagenet_shards.glob("*.tar"))
    original = load_manifest(imagenet_shards)
    scanned = build_manifest(urls, original.class_names)
    assert scanned == original and scanned.fingerprint == original.fingerprint
    inferred = build_manifest(urls)  # no names: C = largest label + 1, names "0".."C-1"
    largest = max(s.label for i in range(3) for s in iter_shard(original, i))
    assert inferred.num_classes == largest + 1 and inferred.class_names[:2] == ("0", "1")
    assert build_manifest(urls, num_classes=1000).num_classes == 1000


def test_natural_shard_order(tmp_path):
    samples = list(imagenet_like_samples(3))
    for name, (key, parts) in zip(("s-10", "s-2", "s-1"), samples, strict=True):
        write_shards([(key, parts)], tmp_path / name, class_names=["a"] * 1000, prefix=name)
        shutil.move(tmp_path / name / f"{name}-000000.tar", tmp_path / f"{name}.tar")
    assert [u.rsplit("/", 1)[1] for u in list_shards(tmp_path)] == ["s-1.tar", "s-2.tar", "s-10.tar"]


def test_a_re_encoded_shard_with_the_same_keys_changes_the_fingerprint(imagenet_shards, tmp_path):
    import io

    from PIL import Image

    original = load_manifest(imagenet_shards)
    reencoded = []
    for s in iter_shard(original, 0):
        buf = io.BytesIO()
        Image.fromarray(s.image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=60)
        reencoded.append((s.key, {"jpg": buf.getvalue(), "cls": str(s.label).encode()}))
    write_shards(reencoded, tmp_path / "new", class_names=original.class_names, samples_per_shard=8)
    shutil.copytree(imagenet_shards, tmp_path / "d")
    shutil.copy(tmp_path / "new" / original.shards[0].name, tmp_path / "d" / original.shards[0].name)
    m = build_manifest(list_shards(tmp_path / "d"), original.class_names)
    assert [s.keys_digest for s in m.shards] == [s.keys_digest for s in original.shards]
    assert [s.num_samples for s in m.shards] == [s.num_samples for s in original.shards]
    assert m.shards[0].sha256 != original.shards[0].sha256 and m.shards[1:] == original.shards[1:]
    assert m.fingerprint != original.fingerprint


def test_shard_check_catches_changes_while_reading(imagenet_shards):
    m = load_manifest(imagenet_shards)
    check = ShardCheck(m.shards[0], "u")
    with pytest.raises(ShardChangedError, match="size 1 bytes"):
        check.check_size(1)
    check.check_size(None)  # filesystems that do not report sizes skip this check
    for i in range(8):
        check.add_key(f"img{i:05d}")
    check.finish()
    with pytest.raises(ShardChangedError, match="more samples"):
        check.add_key("extra")
    short = ShardCheck(m.shards[0], "u")
    short.add_key("img00000")
    with pytest.raises(ShardChangedError, match="1 samples, but the manifest says 8"):
        short.finish()
    other = ShardCheck(m.shards[0], "u")
    for i in range(8):
        other.add_key(f"other{i}")
    with pytest.raises(ShardChangedError, match="keys differ"):
        other.finish()


def test_verify_shards_checks_every_byte(imagenet_shards, tmp_path):
    shutil.copytree(imagenet_shards, tmp_path / "d")
    m = load_manifest(tmp_path / "d")
    assert verify_shards(m) == []
    shard1 = tmp_path / "d" / m.shards[1].name
    data = bytearray(shard1.read_bytes())
    data[700] ^= 0xFF  # inside the first image: same size, same keys
    shard1.write_bytes(bytes(data))
    (tmp_path / "d" / m.shards[2].name).unlink()
    problems = verify_shards(m)
    assert len(problems) == 2
    assert m.shards[1].name in str(problems[0]) and "sha256" in str(problems[0])
    assert m.shards[2].name in str(problems[1]) and "missing" in str(problems[1])
    assert verify_shards(m, [0]) == []
    assert scan_shard(str(shard1)).keys_digest == m.shards[1].keys_digest


def test_parse_shard_selection():
    assert parse_shard_selection("0-3") == [0, 1, 2, 3]
    assert parse_shard_selection("5,0,3") == [0, 3, 5]
    assert parse_shard_selection(" 0-2, 7 ,1", num_shards=8) == [0, 1, 2, 7]
    assert parse_shard_selection(None, num_shards=3) == [0, 1, 2]
    assert parse_shard_selection("all", num_shards=2) == [0, 1]
    for bad in ("3-1", "a", "1-", "-1", "1,,2"):
        with pytest.raises(ShardSelectionError):
            parse_shard_selection(bad)
    with pytest.raises(ShardSelectionError, match="does not exist"):
        parse_shard_selection("0-9", num_shards=5)
    with pytest.raises(ValueError):  # ShardSelectionError is also a ValueError
        parse_shard_selection(None)
