"""Issue 18: webdataset-native shards (brace patterns, .tar.gz, .json labels, pipe: URLs), webdataset's writer
with our bytes, ImageNet's validation layout, parallel conversion, safetensors / timm Hub weights, the webdataset
stage for users' pipelines, and an install that keeps the user's torch."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from logitcache.cache.reader import CacheReader
from logitcache.cli import main
from logitcache.data.convert.folder import write_image_folder
from logitcache.data.convert.scan import build_manifest, expand_sources, read_class_names
from logitcache.data.manifest import load_manifest
from logitcache.data.shards import ShardDataset, iter_shard
from logitcache.data.split import split_shards
from logitcache.data.tar import tarfile_samples
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, dump
from logitcache.errors import (
    BadSampleError,
    CacheMismatchError,
    DataError,
    ShardChangedError,
    ShardFormatError,
    UnsafeCheckpointError,
    WeightsError,
)
from logitcache.models.weights import load_checkpoint, state_dict_digest
from logitcache.models.zoo import build_model
from logitcache.replay import CachedViews, cached_views_stage

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def _image(rng: np.random.Generator, fmt: str, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _invoke(args: list[str]):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory) -> tuple[Path, list[int]]:
    """3 .tar.gz shards written by webdataset's ShardWriter: .jpg/.png/.webp images, labels only in .json."""
    out = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    labels = []
    with wds.ShardWriter(str(out / "train-%06d.tar.gz"), maxcount=6, verbose=0, encoder=False) as sink:
        for i in range(16):
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            labels.append(int(i % 10))
            sink.write({"__key__": f"sample{i:04d}", ext: _image(rng, fmt),
                        "json": json.dumps({"meta": {"label": labels[-1]}, "caption": "x"}).encode()})
    return out, labels


def test_webdataset_shards_scan_dump_train(wds_shards, tmp_path):
    src, labels = wds_shards
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([f"class{i}" for i in range(10)]))
    pattern = str(src / "train-{000000..000002}.tar.gz")
    _invoke(["shards", "scan", pattern, "--label-key", "meta.label", "--classes", classes, "--out", src])
    m = load_manifest(src)
    assert [s.name for s in m.shards] == [f"train-{i:06d}.tar.gz" for i in range(3)]
    assert [s.num_samples for s in m.shards] == [6, 6, 4] and m.label_key == "meta.label"
    assert m.class_names[3] == "class3"
    assert [s.label for k in range(3) for s in iter_shard(m, k)] == labels
    assert json.loads((src / "manifest.json").read_text())["version"] == 2  # old readers refuse, not misread

    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(build_model("smallcnn", 10).state_dict(), str(weights))
    cache, run = tmp_path / "cache.zarr", tmp_path / "run"
    _invoke(["dump", "--teacher", "smallcnn", "--weights", weights, "--data", src, "--out", cache,
             "--recipe", "small", "--epochs", "1", "--topk", "5", "--batch-size", "8"])
    _invoke(["train", "--data", src, "--val", src, "--cache", cache, "--student", "smallcnn", "--loss", "kd",
             "--epochs", "1", "--batch-size", "8", "--out", run])
    assert (run / "metrics.jsonl").read_text().strip()


def test_scan_takes_a_url_list_and_parallel_scans_agree(wds_shards, tmp_path):
    src, _ = wds_shards
    listing = tmp_path / "urls.txt"
    listing.write_text("# shards in order\n" + "".join(f"{src}/train-{i:06d}.tar.gz\n" for i in range(3)))
    urls = expand_sources(str(listing))
    assert urls == expand_sources(str(src / "train-{000000..000002}.tar.gz")) == expand_sources(str(src))
    one = build_manifest(urls, label_key="meta.label", base_url=str(src))
    two = build_manifest(urls, label_key="meta.label", base_url=str(src), workers=2)
    assert one == two and one.fingerprint == two.fingerprint and one.num_classes == 10


def test_json_label_problems_name_the_sample(tmp_path):
    rng = np.random.default_rng(1)
    samples = [("a", {"png": _image(rng, "PNG"), "json": b'{"label": 1}'}),
               ("b", {"png": _image(rng, "PNG"), "json": b'{"other": 1}'}),
               ("c", {"png": _image(rng, "PNG"), "json": b'{"label": "x"}'}),
               ("d", {"png": _image(rng, "PNG")})]
    write_shards(iter(samples), tmp_path / "d", class_names=["0", "1"], samples_per_shard=10)
    (tmp_path / "d" / "manifest.json").unlink()
    m = build_manifest(expand_sources(str(tmp_path / "d")), ["0", "1"], label_key="label")
    m.save(tmp_path / "d")
    with pytest.raises(BadSampleError, match=r"shard-000000.tar:b: .json has no 'label'"):
        list(iter_shard(tmp_path / "d", 0))
    got = [s.key for s in iter_shard(tmp_path / "d", 0, skip_bad=True)]
    assert got == ["a"]


def test_webdataset_writer_keeps_our_bytes(tmp_path):
    """write_shards goes through webdataset's TarWriter; its bytes equal the tarfile GNU writer of v1."""
    samples = [(f"k{i:03d}", {"png": bytes([i]) * (300 + i), "cls": str(i % 3).encode()}) for i in range(5)]
    samples.append(("deep/" + "x" * 120, {"jpg": b"abc", "cls": b"1"}))  # a GNU long name
    m = write_shards(iter(samples), tmp_path / "new", class_names=["a", "b", "c"])
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for key, parts in samples:
            for ext in sorted(parts):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(parts[ext]), 0, 0o644, 0, 0, "", ""
                tar.addfile(ti, io.BytesIO(parts[ext]))
    assert (tmp_path / "new" / m.shards[0].name).read_bytes() == ref.getvalue()


def test_our_tar_reader_catches_what_tarfile_streams_miss(tmp_path):
    """The reason our tar reader stays (plugged into webdataset's grouping): a damaged header in the middle of
    a shard silently ends it in tarfile's stream mode (which webdataset's tarfile_to_samples uses)."""
    samples = [(f"k{i:03d}", {"jpg": bytes([i]) * 1000, "cls": b"0"}) for i in range(10)]
    m = write_shards(iter(samples), tmp_path / "d", class_names=["a"])
    shard = tmp_path / "d" / m.shards[0].name
    data = bytearray(shard.read_bytes())
    data[5 * (512 + 1024 + 512 + 512) + 10] ^= 0xFF  # a name byte of sample 5's first header
    shard.write_bytes(bytes(data))
    theirs = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    assert len(theirs) == 5  # no error: half the shard is gone
    with pytest.raises(ShardFormatError, match=r"d/shard-000000.tar:k004: truncated or corrupt tar"):
        list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), tarfile_samples))


def test_a_damaged_tar_gz_is_an_error_not_silent(tmp_path):
    """A flipped byte inside a .tar.gz fails gzip's CRC check (the reader reads the stream to its trailer)."""
    import gzip

    samples = [(f"k{i:03d}", {"jpg": np.random.default_rng(i).bytes(3000), "cls": b"0"}) for i in range(6)]
    m = write_shards(iter(samples), tmp_path / "d", class_names=["a"])
    (tmp_path / "g").mkdir()
    gz = tmp_path / "g" / "shard-000000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "d" / m.shards[0].name).read_bytes(), mtime=0))
    build_manifest([str(gz)], ["a"]).save(tmp_path / "g")
    assert [r["jpg"] for r in tarfile_samples([{"url": str(gz)}])] == [p["jpg"] for _, p in samples]
    data = bytearray(gz.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside sample data: tar headers and sizes stay intact
    gz.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"shard-000000.tar.gz:k\d+: truncated or corrupt"):
        list(iter_shard(tmp_path / "g", 0, skip_bad=True))  # (the bytes are not images: skipped)


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_split_is_webdatasets_split_by_node_then_worker(monkeypatch, world, workers):
    order = [7, 3, 9, 0, 4, 1, 8, 2, 6, 5, 11]
    seen = []
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", str(workers))
            theirs = list(wds.split_by_worker(wds.split_by_node(iter(order))))
            assert split_shards(order, rank, world, worker, workers) == theirs
            seen += theirs
    assert sorted(seen) == sorted(order)  # exactly once


def test_pipe_urls_run_only_when_allowed(small_shards, tmp_path, monkeypatch):
    base = load_manifest(small_shards)
    pattern = f"pipe:cat {small_shards}/shard-{{000000..00000{len(base.shards) - 1}}}.tar"
    _invoke(["shards", "scan", pattern, "--classes", _names_file(tmp_path, base.class_names), "--out", tmp_path])
    m = load_manifest(tmp_path)
    assert m.shards[0].name.startswith("pipe:cat ") and [s.sha256 for s in m.shards] == [s.sha256 for s in base.shards]
    monkeypatch.delenv("LOGITCACHE_ALLOW_PIPE", raising=False)
    with pytest.raises(DataError, match="LOGITCACHE_ALLOW_PIPE=1"):
        list(iter_shard(m, 0))
    monkeypatch.setenv("LOGITCACHE_ALLOW_PIPE", "1")
    ours = [(s.index, s.label) for k in range(len(m.shards)) for s in iter_shard(m, k)]
    assert ours == [(s.index, s.label) for k in range(len(base.shards)) for s in iter_shard(base, k)]


def _names_file(tmp_path: Path, names) -> Path:
    p = tmp_path / "names.txt"
    p.write_text("\n".join(names) + "\n")
    return p


def test_class_names_from_files_and_folders(tmp_path):
    (tmp_path / "l.json").write_text('["cat", "dog"]')
    (tmp_path / "d.json").write_text('{"1": ["n02", "dog"], "0": ["n01", "cat"]}')
    (tmp_path / "t.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    (tmp_path / "w.txt").write_text("T-shirt/top\nAnkle boot\n")
    assert read_class_names(str(tmp_path / "l.json")) == ["cat", "dog"]
    assert read_class_names(str(tmp_path / "d.json")) == ["n01", "n02"]
    assert read_class_names(str(tmp_path / "t.txt")) == ["n01440764", "n01443537"]
    assert read_class_names(str(tmp_path / "w.txt")) == ["T-shirt/top", "Ankle boot"]
    (tmp_path / "bad.json").write_text('{"0": "a", "2": "b"}')
    with pytest.raises(DataError, match="keys 0..1"):
        read_class_names(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ image folders: ImageNet val, parallel
SYNSETS = ["n01440764", "n01443537", "n02119789", "n09999999"]  # sorted; the devkit fixture's 4 leaves


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """ImageNet's validation layout: a flat folder of ILSVRC2012_val_*.JPEG, the synset of each, and a train/
    tree of synset folders (for the class names)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(2)
    val = root / "val"
    val.mkdir()
    truth = [SYNSETS[i] for i in (2, 0, 3, 1, 1, 2, 0)]
    for i in range(len(truth)):
        (val / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(_image(rng, "JPEG", 32))
    for s in SYNSETS:
        (root / "train" / s).mkdir(parents=True)
    return val, truth, root / "train"


def _labels(out) -> list[int]:
    m = load_manifest(out)
    return [s.label for k in range(len(m.shards)) for s in iter_shard(m, k)]


def test_imagenet_val_layout_converts(val_folder, tmp_path):
    val, truth, train = val_folder
    names = sorted(p.name for p in val.iterdir())
    want = [SYNSETS.index(s) for s in truth]
    caffe = tmp_path / "val.txt"  # "file index" in sorted-synset order
    caffe.write_text("".join(f"{n} {w}\n" for n, w in zip(names, want, strict=True)))
    kaggle = tmp_path / "LOC_val_solution.csv"  # "ImageId,PredictionString" with boxes
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{n.split('.')[0]},{s} 1 2 3 4 {s} 5 6 7 8\n" for n, s in reversed(list(zip(names, truth, strict=True)))))
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    ids = {"n02119789": 1, "n01440764": 2, "n09999999": 3, "n01443537": 4}  # the fixture's ILSVRC2012_IDs
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[s]}\n" for s in truth))
    results = []
    for fixture in ("devkit_meta_compressed.mat", "devkit_meta_plain.mat"):
        shutil.copy(DATA / fixture, devkit / "meta.mat")
        out = tmp_path / f"dev-{fixture}"
        _invoke(["shards", "folder", val, "--labels", devkit / "ILSVRC2012_validation_ground_truth.txt",
                 "--class-folders", train, "--out", out, "--samples-per-shard", "3", "--no-shuffle"])
        results.append(out)
    for i, labels in enumerate((caffe, kaggle)):
        out = tmp_path / f"other{i}"
        _invoke(["shards", "folder", val, "--labels", labels, "--class-folders", train, "--out", out,
                 "--samples-per-shard", "3", "--no-shuffle"])
        results.append(out)
    for out in results:
        m = load_manifest(out)
        assert list(m.class_names) == SYNSETS and _labels(out) == want
        assert m.fingerprint == load_manifest(results[0]).fingerprint
    (devkit / "meta.mat").unlink()
    res = CliRunner().invoke(main, ["shards", "folder", str(val), "--labels",
                                    str(devkit / "ILSVRC2012_validation_ground_truth.txt"), "--out",
                                    str(tmp_path / "x")])
    assert res.exit_code != 0 and "meta.mat" in res.output


def test_parallel_folder_conversion_writes_the_same_bytes(tmp_path):
    rng = np.random.default_rng(3)
    for c in ("a", "b", "c"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(7):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(_image(rng, "JPEG", 24 + i))
    one = write_image_folder(tmp_path / "src", tmp_path / "one", samples_per_shard=4)
    two = write_image_folder(tmp_path / "src", tmp_path / "two", samples_per_shard=4, workers=2)
    assert one == two and len(one.shards) == 6
    for s in one.shards:
        assert (tmp_path / "one" / s.name).read_bytes() == (tmp_path / "two" / s.name).read_bytes()


# ------------------------------------------------------------------ weights: safetensors, hub, pickle refused
def test_safetensors_teacher_dumps_with_the_state_dict_files_digest(small_shards, tmp_path):
    torch.manual_seed(7)
    state = build_model("smallcnn", 10).state_dict()
    torch.save(state, tmp_path / "t.pt")
    safetensors.torch.save_file(state, str(tmp_path / "t.safetensors"))
    groups = []
    for f in ("t.pt", "t.safetensors"):
        out = tmp_path / f"{f}.zarr"
        dump(DumpConfig(data=str(small_shards), out=str(out), teacher="smallcnn", weights=str(tmp_path / f),
                        recipe="small", epochs=1, topk=5, seed=0, batch_size=8, progress=False))
        reader = CacheReader(str(out))
        groups.append((reader.meta.weights_digest, reader.read_unit(0, 0).topk(reader.meta).logits.numpy()))
    from_pt = build_model("smallcnn", 10, weights=str(tmp_path / "t.pt"))
    assert groups[0][0] == groups[1][0] == state_dict_digest(from_pt)
    np.testing.assert_array_equal(groups[0][1], groups[1][1])


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_only_checkpoint_is_refused_whatever_its_name(tmp_path):
    for name in ("evil.pt", "evil.safetensors"):  # safetensors is recognised by its bytes, not its name
        torch.save({"model": _Payload()}, tmp_path / name)
        with pytest.raises(UnsafeCheckpointError, match="needs pickle"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "broken.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"a": ')
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "broken.safetensors")


def test_timm_weights_from_safetensors_and_the_hub_cache(tmp_path, monkeypatch):
    pytest.importorskip("timm", reason="timm is the dev extra's; timm:NAME models need it")
    torch.manual_seed(1)
    state = build_model("timm:resnet18", 10).state_dict()
    safetensors.torch.save_file(state, str(tmp_path / "r18.safetensors"))
    loaded = build_model("timm:resnet18", 10, weights=str(tmp_path / "r18.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"hf-hub:timm/resnet18\.\w+: not in the local Hugging Face cache.*"
                                           r"needs a local file.*--weights /path/to/model.safetensors"):
        build_model("timm:resnet18", 10, weights="pretrained")
    snap = tmp_path / "hub" / "models--someone--r18" / "snapshots" / "0123abc"  # a cache as the Hub client lays it
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--someone--r18" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--r18" / "refs" / "main").write_text("0123abc")
    shutil.copy(tmp_path / "r18.safetensors", snap / "model.safetensors")
    loaded = build_model("timm:resnet18", 10, weights="hf-hub:someone/r18")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ------------------------------------------------------------------ the webdataset stage
@pytest.fixture(scope="module")
def small_cache(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "cache.zarr"
    torch.manual_seed(5)
    weights = tmp_path_factory.mktemp("stage_w") / "w.safetensors"
    safetensors.torch.save_file(build_model("smallcnn", 10).state_dict(), str(weights))
    dump(DumpConfig(data=str(small_shards), out=str(out), teacher="smallcnn", weights=str(weights),
                    recipe="small", epochs=2, topk=5, seed=1, batch_size=8, progress=False))
    return out


def test_webdataset_stage_attaches_the_cached_views(small_shards, small_cache):
    m = load_manifest(small_shards)
    urls = [m.shard_url(i) for i in range(len(m.shards))]
    for epoch in (0, 1):
        stage = cached_views_stage(small_shards, small_cache, epoch=epoch)
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls[::-1]), tarfile_samples, stage,
                                    wds.to_tuple("image", "soft", "target", "index"))
        ours = {int(i): (img, soft, t) for img, soft, t, i in pipeline}
        ref = CachedViews(small_shards, small_cache, epoch=epoch, return_index=True)
        n = 0
        for img, soft, t, i in ref:
            got = ours[int(i)]
            assert torch.equal(got[0], img) and got[2] == t
            assert torch.equal(got[1].indices, soft.indices) and torch.equal(got[1].logits, soft.logits)
            n += 1
        assert n == len(ours) == m.num_samples


def test_readme_webdataset_loop_runs_with_workers(small_shards, small_cache):
    """The README's timm-style loop: shard list, node/worker split, our tar stage, the cached-views stage,
    shuffle, tuples, batches with `collate`, a DataLoader with 2 workers; every sample exactly once."""
    from logitcache.losses import nkd
    from logitcache.replay import collate

    m = load_manifest(small_shards)
    stage = cached_views_stage(small_shards, small_cache, epoch=1)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([m.shard_url(i) for i in range(len(m.shards))], seed=1),
        wds.split_by_node, wds.split_by_worker, tarfile_samples, stage, wds.shuffle(8, rng=random.Random(0)),
        wds.to_tuple("image", "soft", "target", "index"), wds.batched(5, collation_fn=collate),
    )
    student = build_model("smallcnn", 10)
    seen = []
    for images, teacher, target, index in torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2):
        logits = student(images.float() / 255)
        loss = torch.nn.functional.cross_entropy(logits, target) + nkd(logits, teacher, target)
        assert torch.isfinite(loss)
        seen += index.tolist()
    assert sorted(seen) == list(range(m.num_samples))


def test_webdataset_stage_refuses_other_data(small_shards, small_cache, imagenet_shards, tmp_path):
    with pytest.raises(CacheMismatchError, match="other data"):
        cached_views_stage(imagenet_shards, small_cache, epoch=0)
    stage = cached_views_stage(small_shards, small_cache, epoch=0)
    m = load_manifest(small_shards)
    raw = list(tarfile_samples([{"url": m.shard_url(0)}]))
    with pytest.raises(ShardChangedError, match="samples, but the manifest says"):
        list(stage(iter(raw[:-1])))  # a sample lost before the stage
    with pytest.raises(DataError, match="not a shard of the dataset"):
        list(stage(iter([{**raw[0], "__url__": "elsewhere/other.tar"}])))


def _index(sample):
    return sample.index


def test_shard_dataset_reads_through_webdatasets_worker_split(small_shards, monkeypatch):
    ds = ShardDataset(small_shards, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_index)
    assert sorted(loader) == list(range(load_manifest(small_shards).num_samples))
    monkeypatch.setenv("WORKER", "0")  # would make every worker read worker 0's shards
    monkeypatch.setenv("NUM_WORKERS", "1")
    with pytest.raises(DataError, match="contradict this DataLoader worker"):
        list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_index))


# ------------------------------------------------------------------ installing next to the user's torch
def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    d = site / f"{name}-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (d / "RECORD").write_text("")


def _dry_run_install(venv: Path, *extra: str) -> list[str]:
    report = venv / "report.json"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--no-index",
                    "--no-build-isolation", "--report", str(report), "-q", "-e", str(REPO), *extra],
                   check=True, capture_output=True, text=True, timeout=120)
    return [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]


def _venv_seeing_this_environment(tmp: Path) -> tuple[Path, Path]:
    """A venv whose site-packages also sees this interpreter's packages (a .pth file): pip there finds the
    installed torch etc. as already installed, offline, without copying gigabytes."""
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    here = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    (site / "zz_this_environment.pth").write_text("\n".join(here) + "\n")
    return venv, site


def test_install_keeps_the_users_torch(tmp_path):
    """pip install into an environment holding another CUDA build of torch (faked: 2.9.0+cu128) installs only
    logitcache; with the constraints file and the pinned pair present, nothing of torch moves either."""
    venv, site = _venv_seeing_this_environment(tmp_path)
    assert _dry_run_install(venv, "-c", str(REPO / "constraints.txt")) == ["logitcache"]
    _fake_dist(site, "torch", "2.9.0+cu128")
    _fake_dist(site, "torchvision", "0.24.0+cu128", ("torch==2.9.0",))
    assert _dry_run_install(venv) == ["logitcache"]
    # the control: the same project pinning the pair (as before issue 18) wants another torch there
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    (pinned / "logitcache").mkdir()
    shutil.copy(REPO / "logitcache" / "__init__.py", pinned / "logitcache" / "__init__.py")
    shutil.copy(REPO / "README.md", pinned / "README.md")
    text = (REPO / "pyproject.toml").read_text()
    (pinned / "pyproject.toml").write_text(text.replace('"torch>=2.5,<3"', '"torch==2.14.1"'))
    assert '"torch==2.14.1"' in (pinned / "pyproject.toml").read_text()
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--no-index",
                          "--no-build-isolation", "-e", str(pinned)], capture_output=True, text=True, timeout=120)
    # pip would have to fetch torch 2.14.1 to replace 2.9.0 (offline here, it cannot)
    assert res.returncode != 0 and "depends on torch==2.14.1" in res.stdout + res.stderr
