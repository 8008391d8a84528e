"""Shards: writing (deterministic), reading (stages, indices, rank/worker split, URLs), bad input, the CLI."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from _data_helpers import imagenet_like_samples, make_jpeg, make_png_gray, write_idx
from click.testing import CliRunner
from PIL import Image

from logitcache.cli import main
from logitcache.data.convert.fashion_mnist import FASHION_MNIST_CLASSES, read_idx
from logitcache.data.convert.scan import build_manifest, scan_shard
from logitcache.data.decode import decode_image
from logitcache.data.manifest import load_manifest
from logitcache.data.shards import ShardDataset, SkipStats, iter_shard, shuffle_buffer
from logitcache.data.split import split_shards
from logitcache.data.tar import group_by_key, tar_members
from logitcache.data.write import write_shards
from logitcache.errors import BadSampleError, DataError, ShardChangedError, ShardFormatError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _all_samples(manifest, **kw):
    return [s for i in range(len(manifest.shards)) for s in iter_shard(manifest, i, **kw)]


def _tar_contents(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


# ------------------------------------------------------------------ writing and reading back
def test_round_trip_same_bytes_and_labels(tmp_path):
    samples = list(imagenet_like_samples(10, seed=5))
    m = write_shards(samples, tmp_path, class_names=[str(i) for i in range(1000)], samples_per_shard=4)
    assert [s.num_samples for s in m.shards] == [4, 4, 2]
    members = [x for s in m.shards for x in _tar_contents(tmp_path / s.name)]
    expected = [(f"{k}.{ext}", parts[ext]) for k, parts in samples for ext in sorted(parts)]
    assert members == expected
    read = _all_samples(load_manifest(tmp_path))
    assert [s.key for s in read] == [k for k, _ in samples]
    assert [s.label for s in read] == [int(p["cls"]) for _, p in samples]
    assert [s.index for s in read] == list(range(10))
    for s, (_, parts) in zip(read, samples, strict=True):
        ref = np.array(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
        assert s.image.dtype == torch.uint8 and torch.equal(s.image, torch.from_numpy(ref).permute(2, 0, 1))


def test_writing_is_deterministic(tmp_path):
    samples = list(imagenet_like_samples(6, seed=6))
    a = write_shards(samples, tmp_path / "a", class_names=["x"] * 1000, samples_per_shard=4)
    b = write_shards(iter(samples), tmp_path / "b", class_names=["x"] * 1000, samples_per_shard=4)
    assert a == b and a.fingerprint == b.fingerprint
    for s in a.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()
        with tarfile.open(tmp_path / "a" / s.name) as tar:
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(0, 0, 0, "", "", 0o644)}
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(Exception, match="already holds a dataset"):
        write_shards(samples, tmp_path / "a", class_names=["x"] * 1000)
    c = write_shards(samples[:2], tmp_path / "a", class_names=["x"] * 1000, overwrite=True)  # stale shards go
    assert len(c.shards) == 1 and len(list((tmp_path / "a").glob("*.tar"))) == 1


def test_max_bytes_closes_shards_early(tmp_path):
    samples = list(imagenet_like_samples(8, seed=7))
    biggest = max(sum(len(v) for v in p.values()) for _, p in samples)
    m = write_shards(samples, tmp_path, class_names=["x"] * 1000, samples_per_shard=100, max_bytes=3 * biggest)
    assert len(m.shards) > 1 and sum(s.num_samples for s in m.shards) == 8
    # a shard never holds more than its byte budget, except a single sample that alone is larger
    assert all(s.size <= 3 * biggest + 10240 or s.num_samples == 1 for s in m.shards)


def test_writer_refuses_duplicate_and_unusable_keys(tmp_path):
    s = list(imagenet_like_samples(2))
    with pytest.raises(DataError, match="duplicate sample key"):
        write_shards([s[0], s[0]], tmp_path / "a", class_names=["x"] * 1000)
    with pytest.raises(DataError, match="cannot name tar members"):
        write_shards([("a.b", s[0][1])], tmp_path / "b", class_names=["x"] * 1000)


def test_indices_and_images_of_the_fixtures(imagenet_shards, small_shards):
    m = load_manifest(imagenet_shards)
    read = _all_samples(m)
    assert [s.index for s in read] == list(range(24))
    assert all(s.index == m.shards[s.shard].first_index + s.offset for s in read)
    assert all(s.image.shape[0] == 3 and 40 <= s.image.shape[1] <= 64 for s in read)
    assert all(s.where == f"{m.shard_url(s.shard)}:{s.key}" for s in read)
    small = _all_samples(load_manifest(small_shards))
    assert len(small) == 24 and all(s.image.shape == (3, 28, 28) for s in small)
    assert all(torch.equal(s.image[0], s.image[1]) and torch.equal(s.image[0], s.image[2]) for s in small)
    assert load_manifest(small_shards).class_names == FASHION_MNIST_CLASSES


def test_decoders_agree(imagenet_shards, small_shards):
    """torchvision's decoder (the default, it is faster) gives PIL's pixels, so the choice cannot move a view."""
    for d in (imagenet_shards, small_shards):
        m = load_manifest(d)
        for raw in group_by_key(tar_members(open(m.shard_url(0), "rb"), "u"), "u"):
            data = raw.get("jpg", raw.get("png"))
            assert torch.equal(decode_image(data, "torchvision"), decode_image(data, "pil"))


def test_stages_compose_on_plain_lists():
    members = [("a.jpg", b"1"), ("a.cls", b"0"), ("dir/b.seg.png", b"2"), ("._junk.jpg", b""), ("README", b"x")]
    assert list(group_by_key(members, "u")) == [
        {"__key__": "a", "__url__": "u", "jpg": b"1", "cls": b"0"},
        {"__key__": "dir/b", "__url__": "u", "seg.png": b"2"},
    ]
    import random

    out = list(shuffle_buffer(range(50), 8, random.Random(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(shuffle_buffer(range(50), 8, random.Random(0)))


# ------------------------------------------------------------------ the rank/worker split
def _many_shards(tmp_path, n_shards=6, per_shard=3):
    rng = np.random.default_rng(8)
    samples = ((f"s{i:04d}", {"png": make_png_gray(rng, 8), "cls": str(i % 10).encode()})
               for i in range(n_shards * per_shard))
    write_shards(samples, tmp_path, class_names=FASHION_MNIST_CLASSES, samples_per_shard=per_shard)
    return load_manifest(tmp_path)


def _index_of(sample):
    return sample.index


def test_two_ranks_times_two_dataloader_workers_read_every_sample_once(tmp_path):
    m = _many_shards(tmp_path)
    for shuffle_seed in (None, 3):
        seen, per_reader = [], []
        for rank in range(2):
            ds = ShardDataset(m, rank=rank, world_size=2, transform=_index_of, shuffle_seed=shuffle_seed, epoch=1)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
            got = [int(i) for i in loader]
            seen += got
            per_reader.append(got)
            assert ds.num_samples() == len(got)
        assert sorted(seen) == list(range(m.num_samples))
        assert all(per_reader)


def test_split_is_exact_for_any_counts_and_epochs(imagenet_shards, monkeypatch):
    m = load_manifest(imagenet_shards)  # 3 shards: fewer than 2 ranks x 2 workers, one reader gets nothing
    readers = [split_shards(range(3), r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(itertools.chain(*readers)) == [0, 1, 2] and [] in readers
    for world, workers, n in ((1, 1, 7), (3, 2, 7), (2, 4, 5), (4, 1, 13)):
        got = [s for r in range(world) for w in range(workers) for s in split_shards(range(n), r, world, w, workers)]
        assert sorted(got) == list(range(n))
    orders = {tuple(ShardDataset(m, shuffle_seed=0, epoch=e).shard_order()) for e in range(6)}
    assert len(orders) > 1 and all(sorted(o) == [0, 1, 2] for o in orders)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = ShardDataset(m, shards=[0, 1, 2], transform=_index_of)
    assert (ds.rank, ds.world_size) == (1, 2) and list(ds) == list(range(8, 16))
    with pytest.raises(Exception, match="do not exist"):
        ShardDataset(m, shards=[3])


def test_reading_through_fsspec_urls(imagenet_shards):
    fs = fsspec.filesystem("memory")
    for p in imagenet_shards.iterdir():
        fs.pipe(f"/ds/{p.name}", p.read_bytes())
    remote = load_manifest("memory://ds")
    assert remote.shard_url(0).startswith("memory://")
    local = load_manifest(imagenet_shards)
    a, b = _all_samples(remote), _all_samples(local)
    assert [(s.index, s.key, s.label) for s in a] == [(s.index, s.key, s.label) for s in b]
    assert all(torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert scan_shard(remote.shard_url(2)).sha256 == local.shards[2].sha256
    fs.rm("/ds", recursive=True)


# ------------------------------------------------------------------ bad input
_BAD_CASES = {
    # key: (parts, kind, what the message says)
    "corrupt": ({"jpg": bytes(range(256)) * 4, "cls": b"1"}, "bad image", "cannot decode .jpg"),
    "truncated": (None, "bad image", "cannot decode .jpg"),
    "nolabel": (None, "no label", "no .cls label"),
    "textlabel": (None, "bad label", "not an integer: 'cat'"),
    "toolarge": (None, "label out of range", "label 10 outside [0, 10)"),
    "negative": (None, "label out of range", "label -1 outside [0, 10)"),
    "noimage": ({"cls": b"2"}, "no image", "no image"),
}


def _bad_dataset(tmp_path):
    rng = np.random.default_rng(9)
    good = make_jpeg(rng, 50, 60)
    parts = {
        "corrupt": _BAD_CASES["corrupt"][0],
        "truncated": {"jpg": good[: len(good) // 2], "cls": b"1"},
        "nolabel": {"jpg": good},
        "textlabel": {"jpg": good, "cls": b"cat"},
        "toolarge": {"jpg": good, "cls": b"10"},
        "negative": {"jpg": good, "cls": b"-1"},
        "noimage": _BAD_CASES["noimage"][0],
    }
    samples = []
    for i, (key, p) in enumerate(parts.items()):
        samples.append((f"good{i}", {"jpg": good, "cls": b"3"}))
        samples.append((key, p))
    samples.append(("goodlast", {"jpg": good, "cls": b"4"}))
    # shard i = (good_i, bad case i), so each bad case is the first error of its own shard
    write_shards(samples, tmp_path, class_names=[str(i) for i in range(10)], samples_per_shard=2)
    return load_manifest(tmp_path), [k for k, _ in samples]


def test_every_bad_sample_is_a_clear_error_naming_url_and_key(tmp_path):
    m, keys = _bad_dataset(tmp_path)
    for shard, (key, (_, kind, text)) in enumerate(_BAD_CASES.items()):
        assert keys[2 * shard + 1] == key
        it = iter_shard(m, shard)
        assert next(it).key == f"good{shard}"
        with pytest.raises(BadSampleError) as info:
            next(it)
        e = info.value
        assert str(e).startswith(f"{m.shard_url(shard)}:{key}: ") and text in str(e), str(e)
        assert (e.url, e.key, e.kind) == (m.shard_url(shard), key, kind)
    assert [s.key for s in iter_shard(m, len(_BAD_CASES))] == ["goodlast"]


def test_skip_mode_counts_and_keeps_indices(tmp_path):
    m, keys = _bad_dataset(tmp_path)
    stats = SkipStats()
    read = _all_samples(m, skip_bad=True, stats=stats)
    assert stats.count == len(_BAD_CASES) and len(stats.samples) == len(_BAD_CASES)
    assert stats.by_kind == {"bad image": 2, "no label": 1, "bad label": 1, "label out of range": 2, "no image": 1}
    for shard, (line, key) in enumerate(zip(stats.samples, _BAD_CASES, strict=True)):
        assert line.startswith(f"{m.shard_url(shard)}:{key}: ")
    assert [s.key for s in read] == [k for k in keys if k not in _BAD_CASES]
    assert all(s.index == keys.index(s.key) for s in read)  # a skip never shifts a later index
    assert "7 sample(s) skipped" in str(stats)
    merged = SkipStats().merge(stats).merge(stats)
    assert merged.count == 14 and merged.by_kind["bad image"] == 4


def test_errors_survive_dataloader_workers(tmp_path):
    m, _ = _bad_dataset(tmp_path)
    loader = torch.utils.data.DataLoader(ShardDataset(m, transform=_index_of), batch_size=None, num_workers=1)
    it, message = iter(loader), None
    try:
        for _ in it:
            pass
    except BadSampleError as e:  # re-raised in the main process as our type, so the CLI reports it cleanly
        message = str(e)
    it._shutdown_workers()  # (an iterator left in a traceback would make teardown wait for the worker)
    assert message is not None and f"{m.shard_url(0)}:corrupt: cannot decode .jpg" in message


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_tar(imagenet_shards, tmp_path):
    d = _copy(imagenet_shards, tmp_path / "d")
    m = load_manifest(d)
    shard = d / m.shards[1].name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut inside a member
    for skip in (False, True):  # never skipped: the rest of the shard's indices are unknown
        with pytest.raises(ShardChangedError, match=f"{m.shards[1].name}: size {len(data) // 2} bytes"):
            list(iter_shard(m, 1, skip_bad=skip))
    expected = rf"{shard}:img0001\d: truncated or corrupt tar after this key, at byte \d+ \(member 'img0001\d"
    with pytest.raises(ShardFormatError, match=expected):
        scan_shard(str(shard))
    with pytest.raises(ShardFormatError, match="truncated"):
        list(group_by_key(tar_members(open(shard, "rb"), str(shard)), str(shard)))
    # cut exactly after a member (a valid-looking shorter tar): the end-of-archive blocks are missing
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    cut = members[4].offset_data + ((members[4].size + 511) // 512) * 512
    shard.write_bytes(data[:cut])
    with pytest.raises(ShardFormatError, match="no end-of-archive blocks"):
        scan_shard(str(shard))
    with pytest.raises(ShardChangedError, match="size"):
        list(iter_shard(m, 1))


def test_missing_and_changed_shards(imagenet_shards, tmp_path):
    d = _copy(imagenet_shards, tmp_path / "d")
    m = load_manifest(d)
    (d / m.shards[2].name).unlink()
    with pytest.raises(ShardChangedError, match="missing"):
        list(iter_shard(m, 2))
    # same size, other keys (renamed members): caught by the key digest at the end of the shard
    src = d / m.shards[0].name
    members = _tar_contents(src)
    with tarfile.open(src, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name.replace("img", "pic"))
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    assert src.stat().st_size == m.shards[0].size
    with pytest.raises(ShardChangedError, match="keys differ"):
        list(iter_shard(m, 0))


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def test_duplicate_keys(tmp_path):
    rng = np.random.default_rng(10)
    jpg = make_jpeg(rng, 40, 40)
    _write_tar(tmp_path / "again.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"1"),
                                         ("a.jpg", jpg), ("a.cls", b"0")])
    with pytest.raises(ShardFormatError, match=rf"{tmp_path}/again.tar:a: duplicate key \(it appears again"):
        scan_shard(str(tmp_path / "again.tar"))
    _write_tar(tmp_path / "twice.tar", [("a.jpg", jpg), ("a.jpg", jpg), ("a.cls", b"0")])
    with pytest.raises(ShardFormatError, match=r"twice.tar:a: duplicate key \(two .jpg members\)"):
        build_manifest([str(tmp_path / "twice.tar")], ["c"])


# ------------------------------------------------------------------ converters and the CLI
def test_cli_shards_fashion_mnist(fashion_mnist_idx, tmp_path):
    out = tmp_path / "fm"
    res = CliRunner().invoke(main, ["shards", "fashion-mnist", "--src", str(fashion_mnist_idx), "--out", str(out),
                                    "--samples-per-shard", "10"])
    assert res.exit_code == 0, res.output
    assert "fingerprint" in res.output
    for split, prefix, n in (("train", "train", 24), ("test", "t10k", 8)):
        m = load_manifest(out / split)
        assert m.class_names == FASHION_MNIST_CLASSES and m.num_samples == n
        assert [s.num_samples for s in m.shards] == [10] * (n // 10) + ([n % 10] if n % 10 else [])
        images = read_idx(fashion_mnist_idx / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(fashion_mnist_idx / f"{prefix}-labels-idx1-ubyte.gz")
        read = _all_samples(m)
        assert [s.label for s in read] == labels.tolist()  # file order kept
        assert all(torch.equal(s.image[0], torch.from_numpy(images[s.index].copy())) for s in read)  # lossless
    again = CliRunner().invoke(main, ["shards", "fashion-mnist", "--src", str(fashion_mnist_idx), "--out", str(out),
                                      "--samples-per-shard", "10"])
    assert again.exit_code == 1 and "already holds a dataset" in again.output


def test_cli_shards_fashion_mnist_reports_bad_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    res = CliRunner().invoke(main, ["shards", "fashion-mnist", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "do not pair up" in res.output
    res = CliRunner().invoke(main, ["shards", "fashion-mnist", "--src", str(tmp_path / "nowhere"),
                                    "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "no train-images-idx3-ubyte(.gz)" in res.output


def test_cli_shards_folder(tmp_path):
    rng = np.random.default_rng(11)
    tree = tmp_path / "train"
    files = {}
    for wnid, n in (("n02", 3), ("n01", 4)):
        (tree / wnid).mkdir(parents=True)
        for i in range(n):
            files[f"{wnid}/{wnid}_{i}.v2"] = data = make_jpeg(rng, 30 + i, 40)
            (tree / wnid / f"{wnid}_{i}.v2.JPEG").write_bytes(data)
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(png, format="PNG")
    files["n02/disguised"] = png.getvalue()
    (tree / "n02" / "disguised.JPEG").write_bytes(png.getvalue())  # ImageNet has a PNG named .JPEG
    (tree / "n02" / "notes.txt").write_text("ignored")
    outs = []
    for name in ("a", "b"):
        res = CliRunner().invoke(main, ["shards", "folder", str(tree), "--out", str(tmp_path / name),
                                        "--samples-per-shard", "3"])
        assert res.exit_code == 0, res.output
        outs.append(load_manifest(tmp_path / name))
    m = outs[0]
    assert m == outs[1]  # deterministic, shuffle included
    assert m.class_names == ("n01", "n02") and m.num_samples == 8 and len(m.shards) == 3
    read = _all_samples(m)
    assert sorted(s.key for s in read) == sorted(rel.replace(".", "_") for rel in files)  # no dots in keys
    assert {s.label for s in read if s.key.startswith("n01/")} == {0}
    assert {s.label for s in read if s.key.startswith("n02/")} == {1}
    members = dict(x for s in m.shards for x in _tar_contents(tmp_path / "a" / s.name))
    assert members["n02/disguised.png"] == files["n02/disguised"]  # extension follows the bytes
    for rel, data in files.items():
        if rel != "n02/disguised":
            key = rel.replace(".", "_")
            assert members[f"{key}.jpg"] == data  # copied as is, never re-encoded
    assert [s.key for s in read] != sorted(s.key for s in read)  # shuffled so shards mix classes


def test_cli_shards_scan(imagenet_shards, tmp_path):
    original = load_manifest(imagenet_shards)
    for p in imagenet_shards.glob("*.tar"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "classes.txt").write_text("\n".join(original.class_names) + "\n")
    args = ["shards", "scan", str(tmp_path), "--classes", str(tmp_path / "classes.txt"), "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert load_manifest(tmp_path).fingerprint == original.fingerprint
    assert f'"fingerprint": "{original.fingerprint}"' in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--force" in res.output
    res = CliRunner().invoke(main, ["shards", "scan", str(tmp_path), "--force"])
    assert res.exit_code == 0 and load_manifest(tmp_path).num_classes <= 1000


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="the real Fashion-MNIST IDX files are not installed here")
def test_real_fashion_mnist_files(tmp_path):
    from logitcache.data.convert.fashion_mnist import fashion_mnist_samples

    images = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    labels = read_idx("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    samples = itertools.islice(fashion_mnist_samples("/usr/share/datasets/fashion-mnist/", "train"), 20)
    m = write_shards(samples, tmp_path, class_names=FASHION_MNIST_CLASSES, samples_per_shard=8)
    read = _all_samples(m)
    assert [s.label for s in read] == labels[:20].tolist()
    assert all(torch.equal(s.image[1], torch.from_numpy(images[s.index].copy())) for s in read)
    assert hashlib.sha256(images[:20].tobytes()).hexdigest() == hashlib.sha256(
        np.stack([s.image[0].numpy() for s in read]).tobytes()).hexdigest()


# ------------------------------------------------------------------ the tar reader against other writers
def _tarfile_listing(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 chars: PAX path record, GNU long name, or ustar prefix
    names = ["a.jpg", "a.cls", f"{long_dir}/b.jpg", f"{long_dir}/b.cls", "c.seg.png", "c.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ü" * 70 + ".jpg", "ü" * 70 + ".cls"]  # non-ASCII, long in bytes
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            data = bytes([i]) * (i * 300 + 1)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    with open(path, "rb") as f:
        assert list(tar_members(f, "u")) == _tarfile_listing(path)


def test_tar_reader_rejects_bad_headers(tmp_path):
    path = tmp_path / "x.tar"
    _write_tar(path, [("a.jpg", b"123"), ("a.cls", b"1")])
    data = bytearray(path.read_bytes())
    data[512 + 512 + 3] ^= 0x01  # a byte of the second header's name
    with pytest.raises(ShardFormatError, match="u:a: .*at byte 1024 .*checksum"):
        list(tar_members(io.BytesIO(bytes(data)), "u"))
    with pytest.raises(ShardFormatError, match="empty file"):
        list(tar_members(io.BytesIO(b""), "u"))
    with pytest.raises(ShardFormatError, match="300-byte header"):
        list(tar_members(io.BytesIO(path.read_bytes()[:1024 + 300]), "u"))
    from logitcache.data.tar import _tar_number

    assert _tar_number(b"0000644\0") == 0o644 and _tar_number(b"\x80" + (5).to_bytes(11, "big")) == 5


def test_shards_written_by_webdataset_are_read(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(12)
    jpgs = [make_jpeg(rng, 40, 50 + i) for i in range(5)]
    with wds.TarWriter(str(tmp_path / "wds-0.tar")) as sink:
        for i, j in enumerate(jpgs):
            sink.write({"__key__": f"sample{i:03d}", "jpg": j, "cls": i})
    m = build_manifest([str(tmp_path / "wds-0.tar")], num_classes=10)
    read = _all_samples(m)
    assert [s.label for s in read] == list(range(5)) and [s.key for s in read] == [f"sample{i:03d}" for i in range(5)]
    assert all(torch.equal(s.image, decode_image(j, "pil")) for s, j in zip(read, jpgs, strict=True))


def _declare_size(path, member: int, size: int) -> None:
    """Rewrite the header of the ``member``-th file of a plain ustar (one header block + data blocks each) to
    declare ``size`` bytes, with a valid checksum."""
    data = bytearray(path.read_bytes())
    at = 0
    for _ in range(member):
        at += 512 + -(-int(data[at + 124:at + 135], 8) // 512) * 512
    data[at + 124:at + 136] = (b"\x80" + size.to_bytes(11, "big")) if size >= 8**11 else b"%011o\0" % size
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    path.write_bytes(bytes(data))


def test_a_member_declaring_a_huge_size_is_refused_without_allocating_it(tmp_path):
    """A header's size is never trusted with memory: over `MAX_MEMBER_BYTES` it is refused before any read, and
    below it a file holding fewer bytes is read in pieces (``read(n)`` would allocate n bytes first)."""
    import tracemalloc

    from logitcache.data.tar import MAX_MEMBER_BYTES

    path = tmp_path / "x.tar"
    _write_tar(path, [("a.jpg", b"123"), ("a.cls", b"1"), ("b.jpg", b"456")])
    _declare_size(path, 1, 10**12)
    with open(path, "rb") as f, pytest.raises(ShardFormatError, match=r"u:a: .*'a\.cls' declares 1000000000000 bytes"):
        list(tar_members(f, "u"))
    _declare_size(path, 1, MAX_MEMBER_BYTES // 2)  # allowed, but the file holds a few hundred bytes
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(ShardFormatError, match=rf"has \d+ of its {MAX_MEMBER_BYTES // 2}"):
            list(tar_members(f, "u"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
