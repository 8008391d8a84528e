"""Hostile input, round 2 (issue 19): black-box CLI cases. Each asserts the exit code, a message naming the object
at fault, no traceback, and — for the cases that declare huge sizes — bounded memory: those run the CLI in a
subprocess under ``RLIMIT_AS`` (the address space after importing torch plus `HEADROOM`), so a tool that trusts
a declared size dies of MemoryError (a traceback) instead of passing.

Classes (the issue's numbering): 1 declared sizes, 2 parse errors, 3 damaged caches read by `train`, 4 `verify`
blaming the right thing, 5 strictness (member names, marker keys); plus the "also found" items.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from _cache_edit import flip_unit_byte, unseal
from click.testing import CliRunner

from logitcache.cli import main

GROUP = "smallcnn"
REPO = pathlib.Path(__file__).resolve().parents[1]
#: address space allowed on top of what importing the tool takes; a 30000x30000 RGB decode (2.7 GB) or a
#: 10^12-row chunk cannot fit, everything a hostile-but-refused input needs does
HEADROOM = 1 << 30


# ------------------------------------------------------------------ running the CLI
def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        out += "".join(traceback.format_exception(r.exception))  # an escaped exception IS a traceback
    return r.exit_code, out


_LIMITED = """
import resource, sys
import torch, zarr  # noqa: F401  (what the tool imports anyway, before the limit)
from logitcache.cli import main
size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
limit = size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ['logitcache', *sys.argv[2:]]
main()
"""


def cli_limited(*args, headroom: int = HEADROOM) -> tuple[int, str]:
    """The CLI in a fresh process whose address space may grow by ``headroom`` bytes past its imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _LIMITED, str(headroom), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=300)
    return p.returncode, p.stdout + p.stderr


def refused(rc_out, *names) -> str:
    rc, out = rc_out
    assert rc == 1, f"exit code {rc}:\n{out}"
    assert "Traceback" not in out, out
    assert "MemoryError" not in out, out
    for n in names:
        assert str(n) in out, f"{n!r} not named in:\n{out}"
    return out


# ------------------------------------------------------------------ fixtures
# format 1: the cases edit its five arrays (format 2's packed rows get the same presence/sha256 and metadata checks)
DUMP = ["--format", "1", "--teacher", "smallcnn", "--recipe", "small", "--image-size", "28", "--topk", "3",
        "--epochs", "2", "--batch-size", "8"]


def dumped(small_shards, tmp_path_factory, name: str, args: list) -> pathlib.Path:
    """A cache dumped once per module; the tests damage copies of it (`copied`)."""
    out = tmp_path_factory.mktemp(name) / "cache.zarr"
    rc, text = cli("dump", "--data", small_shards, "--out", out, *args)
    assert rc == 0, text
    return out


def copied(clean: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "cache.zarr"
    shutil.copytree(clean, out)
    return out


@pytest.fixture(scope="module")
def clean(small_shards, tmp_path_factory) -> pathlib.Path:
    return dumped(small_shards, tmp_path_factory, "hostile", DUMP)


@pytest.fixture
def cache(clean, tmp_path) -> pathlib.Path:
    return copied(clean, tmp_path)


def train_args(data, cache, out, *extra):
    return ["train", "--data", data, "--cache", cache, "--student", "smallcnn", "--loss", "kd", "--epochs", "1",
            "--batch-size", "8", "--out", out, "--no-progress", *extra]


def data_objects(cache: pathlib.Path) -> list[pathlib.Path]:
    """The cache's binary objects (chunks): every file under the group that is not JSON metadata."""
    return sorted(p for p in (cache / GROUP).rglob("*") if p.is_file() and not p.name.endswith(".json")
                  and ".tmp" not in p.name)


def edit_json(path: pathlib.Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def logitcache_attrs(path: pathlib.Path, **changes):
    def f(d):
        d["attributes"]["logitcache"].update(changes)

    edit_json(path, f)


# ------------------------------------------------------------------ class 2: parse errors are clear errors
@pytest.mark.parametrize("command", ["info", "verify", "train"])
@pytest.mark.parametrize("where", ["zarr.json", f"{GROUP}/zarr.json"])
def test_truncated_zarr_json(cache, small_shards, tmp_path, where, command):
    path = cache / where
    path.write_bytes(path.read_bytes()[:37])
    args = ["info", cache] if command == "info" else ["verify", cache] if command == "verify" else \
        train_args(small_shards, cache, tmp_path / "run")
    refused(cli(*args), where, "JSON")


@pytest.mark.parametrize("command", ["info", "verify"])
def test_zarr_json_not_an_object(cache, command):
    (cache / GROUP / "zarr.json").write_text("[1, 2]")
    refused(cli(command, cache), f"{GROUP}/zarr.json")


@pytest.mark.parametrize("change, named", [
    ({"k": "three"}, "k"),
    ({"epochs": -1}, "epochs"),
    ({"temperatures": "1,4"}, "temperatures"),
    ({"num_classes": "ten"}, "num_classes"),
    ({"value_dtype": "string"}, "value_dtype"),
])
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_mistyped_group_metadata(cache, small_shards, tmp_path, change, named, command):
    logitcache_attrs(cache / GROUP / "zarr.json", **change)
    args = [command, cache] if command != "train" else train_args(small_shards, cache, tmp_path / "run")
    out = refused(cli(*args), named)
    assert GROUP in out


@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_group_metadata_missing_a_key(cache, small_shards, tmp_path, command):
    edit_json(cache / GROUP / "zarr.json", lambda d: d["attributes"]["logitcache"].pop("param_fields"))
    args = [command, cache] if command != "train" else train_args(small_shards, cache, tmp_path / "run")
    refused(cli(*args), "param_fields", GROUP)


@pytest.mark.parametrize("change, named", [
    ({"shard_lengths": []}, "shard_lengths"),
    ({"num_classes": "four"}, "num_classes"),
    ({"num_shards": 3}, "num_shards"),
    ({"format_version": "one"}, "format_version"),
])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_mistyped_root_metadata(cache, change, named, command):
    logitcache_attrs(cache / "zarr.json", **change)
    refused(cli(command, cache), named, "zarr.json")


def test_string_dtype_in_group_and_array_is_refused(cache):
    """The dtype check compares the array with the group's claim; both say "string" -> still refused."""
    logitcache_attrs(cache / GROUP / "zarr.json", value_dtype="string")
    edit_json(cache / GROUP / "topk_logprobs" / "zarr.json", lambda d: d.update(data_type="string"))
    for command in ("info", "verify"):
        refused(cli(command, cache), "value_dtype", "string")


def test_cache_dataset_manifest_truncated(cache, small_shards, tmp_path):
    path = cache / "dataset_manifest.json"
    path.write_bytes(path.read_bytes()[:50])
    refused(cli("verify", cache, "--data", small_shards), "dataset_manifest.json")
    # train compares the data with the cache's record: a fingerprint that differs makes it read that record
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    edit_json(data / "manifest.json", lambda d: (d.update(class_names=[*d["class_names"][:-1], "X"]),
                                                 d.pop("fingerprint")))
    refused(cli(*train_args(data, cache, tmp_path / "run")), "dataset_manifest.json")


@pytest.mark.parametrize("change, named", [
    (lambda d: d.update(num_classes="four"), "num_classes"),
    (lambda d: d.update(shards="none"), "shards"),
    (lambda d: d["shards"][0].update(num_samples="many"), "num_samples"),
    (lambda d: d.update(class_names=7), "class_names"),
])
@pytest.mark.parametrize("command", ["dump", "train", "verify"])
def test_mistyped_dataset_manifest(small_shards, clean, tmp_path, change, named, command):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    edit_json(data / "manifest.json", change)
    args = {"dump": ["dump", "--data", data, "--out", tmp_path / "c.zarr", *DUMP],
            "train": train_args(data, clean, tmp_path / "run"),
            "verify": ["verify", clean, "--data", data]}[command]
    refused(cli(*args), "manifest.json", named)


def test_truncated_dataset_manifest(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    (data / "manifest.json").write_text('{"format": "logitcache-manifest", "shar')
    refused(cli("dump", "--data", data, "--out", tmp_path / "c.zarr", *DUMP), "manifest.json", "JSON")


@pytest.mark.parametrize("text", ["hello, I am not a checkpoint\n", ""])
def test_checkpoint_that_is_a_text_file(small_shards, tmp_path, text):
    ckpt = tmp_path / "model.pt"
    ckpt.write_text(text)
    refused(cli("eval", "--model", "smallcnn", "--checkpoint", ckpt, "--data", small_shards, "--recipe", "small"),
            str(ckpt))
    refused(cli("dump", "--data", small_shards, "--out", tmp_path / "c.zarr", "--weights", ckpt, *DUMP), str(ckpt))
    refused(cli("train", "--data", small_shards, "--student", "smallcnn", "--loss", "ce", "--init", ckpt,
                "--recipe", "small", "--out", tmp_path / "run", "--no-progress"), str(ckpt))


def test_resume_from_a_text_checkpoint(small_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_text("not a checkpoint")
    refused(cli("train", "--data", small_shards, "--student", "smallcnn", "--loss", "ce", "--recipe", "small",
                "--out", run, "--resume", "--no-progress"), "last.pt")


# ------------------------------------------------------------------ class 1: declared sizes (memory bombs)
def _jpeg_declaring(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture
def bomb_shards(tmp_path) -> pathlib.Path:
    from _data_helpers import make_jpeg

    from logitcache.data.write import write_shards

    rng = np.random.default_rng(0)
    samples = [(f"ok{i}", {"jpg": make_jpeg(rng, 32, 32), "cls": b"1"}) for i in range(3)]
    samples.insert(1, ("bomb", {"jpg": _jpeg_declaring(30000, 30000), "cls": b"2"}))
    out = tmp_path / "bomb"
    write_shards(samples, out, class_names=[str(i) for i in range(10)], samples_per_shard=8)
    return out


def test_jpeg_declaring_30000_px_is_refused_before_decoding(bomb_shards, tmp_path):
    out = refused(cli_limited("dump", "--data", bomb_shards, "--out", tmp_path / "c.zarr", *DUMP), ":bomb:",
                  "30000x30000", "LOGITCACHE_MAX_IMAGE_PIXELS")  # the sample, the declared size, the setting
    # skippable like any bad sample
    rc, out = cli("dump", "--data", bomb_shards, "--out", tmp_path / "c2.zarr", *DUMP, "--skip-bad")
    assert rc == 0 and "Traceback" not in out, out


def test_image_limit_is_a_setting(bomb_shards, tmp_path, monkeypatch):
    from _data_helpers import make_jpeg

    from logitcache.data.decode import decode_image

    jpg = make_jpeg(np.random.default_rng(0), 40, 50)
    monkeypatch.setenv("LOGITCACHE_MAX_IMAGE_PIXELS", "1999")
    with pytest.raises(Exception, match="40x50|50x40"):
        decode_image(jpg)
    monkeypatch.setenv("LOGITCACHE_MAX_IMAGE_PIXELS", "2000")
    assert decode_image(jpg).shape == (3, 40, 50)


def test_manifest_declaring_1e12_samples(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)

    def bomb(d):
        d["shards"][0]["num_samples"] = 10**12
        d["shards"][1]["first_index"] = 10**12
        d.pop("fingerprint")

    edit_json(data / "manifest.json", bomb)
    name = json.loads((data / "manifest.json").read_text())["shards"][0]["name"]
    # refused from the manifest and the file's real size, before a shard is read or a cache created
    refused(cli_limited("dump", "--data", data, "--out", tmp_path / "c.zarr", *DUMP), name, str(10**12), "bytes")
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("what, index", [("shape", 0), ("shape", 2), ("chunk", 2)])  # epochs / rows
def test_array_declaring_1e12_rows(cache, small_shards, tmp_path, what, index):
    def bomb(d):
        if what == "shape":
            d["shape"][index] = 10**12
        else:
            d["chunk_grid"]["configuration"]["chunk_shape"][index] = 10**12

    edit_json(cache / GROUP / "topk_indices" / "zarr.json", bomb)
    run = cli_limited if what == "chunk" else cli  # one under the address-space limit; numpy refuses 10^12 anyway
    refused(run(*train_args(small_shards, cache, tmp_path / "run")), f"{GROUP}/topk_indices", what)
    # verify calls it what it is: metadata, not damaged units (class 4)
    out = refused(cli("verify", cache, "--json"), f"{GROUP}/topk_indices", "metadata")
    assert "do not decode" not in out and "unit (epoch" not in out


def test_group_declaring_1e12_epochs(cache):
    logitcache_attrs(cache / GROUP / "zarr.json", epochs=10**12)
    for name in ("topk_indices", "topk_logprobs", "target_logprob", "lse", "view_params"):
        edit_json(cache / GROUP / name / "zarr.json", lambda d: d["shape"].__setitem__(0, 10**12))
    refused(cli("verify", cache), "epochs")
    refused(cli("info", cache), "epochs")


def test_root_declaring_1e12_shard_length(cache, small_shards, tmp_path):
    logitcache_attrs(cache / "zarr.json", shard_lengths=[10**12, 12])
    refused(cli("verify", cache), "shard_lengths")
    refused(cli(*train_args(small_shards, cache, tmp_path / "run")), "shard_lengths")


# ------------------------------------------------------------------ class 3: damaged caches read by train
def _marker(cache, e, s) -> pathlib.Path:
    """The marker these tests edit. The group is unsealed first (format 2 dumps keep a unit's marker only in its
    epoch's unit index, which readers use instead of markers): one marker object per unit and no index, so readers
    see the edited marker; an index edited the same way goes through the same checks (`UnitMarker.from_json`),
    and `verify` reports an index that disagrees with a marker."""
    unseal(cache, GROUP)
    return cache / GROUP / "units" / f"e{e:05d}-s{s:06d}.json"


def test_train_refuses_a_deleted_chunk(cache, small_shards, tmp_path):
    victim = data_objects(cache)[0]
    victim.unlink()
    out = refused(cli(*train_args(small_shards, cache, tmp_path / "run")), "epoch", "shard", "verify", "--repair")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists(), out


def test_train_refuses_a_flipped_byte(cache, small_shards, tmp_path):
    victim = data_objects(cache)[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    # two epochs: every unit is read
    refused(cli(*train_args(small_shards, cache, tmp_path / "run", "--epochs", "2")), "epoch", "shard", "verify",
            "--repair")


def _rewrite_array_unit(cache, array: str, e: int, s: int, fn) -> None:
    """Change a unit's values *consistently* (valid codecs, marker sha256 updated): only value checks can tell.
    Format 1 layout (one chunk per array per unit)."""
    import zarr

    arr = zarr.open_array(str(cache / GROUP / array), mode="r+").with_config({"write_empty_chunks": True})
    values = np.asarray(arr[e, s])
    arr[e, s] = fn(values)
    key = sorted((cache / GROUP / array / "c" / str(e) / str(s)).rglob("*"))[-1]
    marker = _marker(cache, e, s)
    edit_json(marker, lambda d: d["chunks"].update({array: hashlib.sha256(key.read_bytes()).hexdigest()}))


@pytest.mark.parametrize("array, fn, named", [
    ("topk_logprobs", lambda v: np.where(np.arange(v.shape[0])[:, None] == 1, np.nan, v).astype(v.dtype), "non-finite"),
    ("lse", lambda v: np.where(np.arange(v.shape[0])[:, None] == 2, np.inf, v).astype(v.dtype), "non-finite"),
    ("topk_indices", lambda v: np.where(np.arange(v.shape[0])[:, None] == 0, 500, v).astype(v.dtype), "[0, 10)"),
    ("topk_indices", lambda v: np.where(np.arange(v.shape[0])[:, None] == 0, -3, v).astype(v.dtype), "[0, 10)"),
])
def test_train_refuses_insane_values(cache, small_shards, tmp_path, array, fn, named):
    _rewrite_array_unit(cache, array, 0, 1, fn)
    out = refused(cli(*train_args(small_shards, cache, tmp_path / "run")), "epoch 0, shard 1", named, "verify")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists(), out


def test_non_finite_loss_stops_without_saving(small_shards, tmp_path):
    run = tmp_path / "run"
    out = refused(cli("train", "--data", small_shards, "--student", "smallcnn", "--loss", "ce", "--recipe", "small",
                      "--lr", "1e30", "--epochs", "1", "--batch-size", "4", "--out", run, "--no-progress"),
                  "non-finite loss")
    assert not (run / "checkpoints" / "last.pt").exists(), out


# ------------------------------------------------------------------ class 4: verify names metadata, repair refuses
def test_verify_reports_metadata_not_units_and_repair_refuses(cache, small_shards):
    edit_json(cache / GROUP / "lse" / "zarr.json", lambda d: d["chunk_grid"]["configuration"]["chunk_shape"]
              .__setitem__(2, 10**12))
    rc, out = cli("verify", cache, "--json")
    assert rc == 1 and "Traceback" not in out
    assert f"{GROUP}/lse" in out and "unit (epoch" not in out
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    refused(cli("dump", "--data", small_shards, "--out", cache, *DUMP, "--repair"), f"{GROUP}/lse", "metadata")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ class 5: strictness
@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_shard_member_with_unsafe_name(small_shards, tmp_path, member):
    from _data_helpers import make_png_gray

    data = tmp_path / "data"
    data.mkdir()
    png = make_png_gray(np.random.default_rng(0))
    with tarfile.open(data / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in (("ok.png", png), ("ok.cls", b"1"), (member, png),
                              (member.rsplit(".", 1)[0] + ".cls", b"2")):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))
    refused(cli("shards", "scan", data, "--num-classes", "10"), member)


@pytest.mark.parametrize("change, named", [
    (lambda d: d["chunks"].update(evil="0" * 64), "evil"),
    (lambda d: d["chunks"].pop("lse"), "lse"),
])
def test_marker_with_unexpected_chunk_keys(cache, small_shards, tmp_path, change, named):
    # a unit the 1-epoch run reads (a run reads the markers of the epochs it trains on, not all of them)
    edit_json(_marker(cache, 0, 0), change)
    refused(cli("verify", cache), "e00000-s000000", named)
    refused(cli(*train_args(small_shards, cache, tmp_path / "run")), "e00000-s000000", named)


# ------------------------------------------------------------------ also found: concurrent dumps on one group
def test_two_concurrent_dumps_keep_both_runs(small_shards, tmp_path):
    out = tmp_path / "c.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", "from logitcache.cli import main; main()", "dump",
                               "--data", str(small_shards), "--out", str(out), *DUMP, "--shards", str(s)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rc, text = cli("info", out, "--json")
    assert rc == 0, text
    g = json.loads(text)["groups"][GROUP]
    assert g["shards"] in (None, [0, 1]) and len(g["provenance"]) == 2, g
    assert g["units_finished"] == g["units_total"] == 4
    rc, text = cli("verify", out)
    assert rc == 0, text


# ------------------------------------------------------------------ also found: resume re-checks the cache
def _dump(data, out, *extra):
    rc, text = cli("dump", "--data", data, "--out", out, *DUMP[:-4], "--batch-size", "8", *extra)
    assert rc == 0, text


def test_resume_refuses_a_cache_grown_since(small_shards, tmp_path):
    c = tmp_path / "c.zarr"
    _dump(small_shards, c, "--epochs", "1")
    run = tmp_path / "run"
    rc, text = cli(*train_args(small_shards, c, run))
    assert rc == 0, text
    _dump(small_shards, c, "--epochs", "2")  # 10 -> 20 epochs would silently remap `epoch mod E`
    refused(cli(*train_args(small_shards, c, run)[:-1], "--epochs", "2", "--resume", "--no-progress"),
            "epochs", "1", "2")


def test_resume_refuses_a_cache_redumped_with_other_weights(small_shards, tmp_path):
    import torch

    from logitcache.models.zoo import build_model

    c = tmp_path / "c.zarr"
    _dump(small_shards, c, "--epochs", "1")
    run = tmp_path / "run"
    rc, text = cli(*train_args(small_shards, c, run))
    assert rc == 0, text
    shutil.rmtree(c)
    torch.manual_seed(99)
    weights = tmp_path / "other.pt"
    torch.save(build_model("smallcnn", 10).state_dict(), weights)
    _dump(small_shards, c, "--epochs", "1", "--weights", weights)
    refused(cli(*train_args(small_shards, c, run)[:-1], "--epochs", "2", "--resume", "--no-progress"),
            "weights_digest")


# ------------------------------------------------------------------ also found: flags agree with the cache
def test_image_size_that_agrees_with_the_cache_is_accepted(clean, small_shards, tmp_path):
    rc, text = cli(*train_args(small_shards, clean, tmp_path / "run", "--image-size", "28"))
    assert rc == 0, text
    rc, text = cli(*train_args(small_shards, clean, tmp_path / "run2", "--recipe", "small"))
    assert rc == 0, text
    refused(cli(*train_args(small_shards, clean, tmp_path / "run3", "--image-size", "32")), "28", "32")
    refused(cli(*train_args(small_shards, clean, tmp_path / "run4", "--recipe", "imagenet")), "small", "imagenet")


def test_recipe_comes_from_the_data_when_a_converter_knows_it(fashion_mnist_idx, tmp_path):
    d = tmp_path / "fm"
    rc, text = cli("shards", "fashion-mnist", "--src", fashion_mnist_idx, "--out", d)
    assert rc == 0, text
    run = tmp_path / "run"
    rc, text = cli("train", "--data", d / "train", "--student", "smallcnn", "--loss", "ce", "--epochs", "1",
                   "--batch-size", "8", "--out", run, "--no-progress")
    assert rc == 0, text
    recipe = json.loads((run / "config.json").read_text())["resolved"]["recipe"]
    assert (recipe["name"], recipe["image_size"]) == ("small", 28)


def test_no_recipe_anywhere_is_a_clear_error(small_shards, tmp_path):
    """small_shards' manifest records no default recipe: train must not guess imagenet at 224 px."""
    refused(cli("train", "--data", small_shards, "--student", "smallcnn", "--loss", "ce", "--out", tmp_path / "r",
                "--no-progress"), "--recipe")


def test_training_past_the_dumped_shards_says_which_are_covered(small_shards, tmp_path):
    c = tmp_path / "c.zarr"
    _dump(small_shards, c, "--epochs", "1", "--shards", "0")
    out = refused(cli(*train_args(small_shards, c, tmp_path / "run")), "--shards 0", "dump")
    assert "unfinished" not in out


# ------------------------------------------------------------------ also found: 16-bit PNGs are scaled
def test_16_bit_png_is_scaled_not_clipped():
    from PIL import Image

    from logitcache.data.decode import decode_image

    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    for decoder in ("torchvision", "pil"):
        x = decode_image(buf.getvalue(), decoder)
        assert x.dtype.is_floating_point is False and x[0, 0].tolist() == [0, 1, 128, 255], decoder


# ------------------------------------------------------------------ also found: concurrent runs, durable order
def test_each_dump_run_is_its_own_object(tmp_path):
    """Two writers of one group (two hosts) each record their shards and provenance in their own object: the
    group's shards are the union, both provenance entries are kept, whatever order they write in."""
    import dataclasses

    from _fake_cache import _metas

    from logitcache.cache.reader import CacheReader
    from logitcache.cache.writer import CacheWriter

    url = str(tmp_path / "c.zarr")
    root, meta = _metas()
    a = CacheWriter.create_or_open(url, "g", dataclasses.replace(meta, shards=(0,)), root, {})
    b = CacheWriter.create_or_open(url, "g", dataclasses.replace(meta, shards=(1,)), root, {})
    ka = a.start_run((0,), 2, {"start_time": "2026-01-01T00:00:00", "host": "a"})
    kb = b.start_run((1,), 2, {"start_time": "2026-01-01T00:00:00", "host": "b"})
    b.finish_run(kb, end_time="x")
    a.finish_run(ka, end_time="y")
    got = CacheReader(url, "g").meta
    assert got.shards == (0, 1)
    assert sorted(p["host"] for p in got.provenance) == ["a", "b"]
    assert all("end_time" in p for p in got.provenance)


def test_chunks_are_fsynced_before_their_marker(tmp_path, monkeypatch):
    from _fake_cache import write_fake_cache

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    url = str(tmp_path / "c.zarr")
    write_fake_cache(url)
    markers = [i for i, (kind, path) in enumerate(events) if kind == "replace" and "/units/e" in path]
    assert len(markers) == 4
    for i in markers:
        e, s = (int(x[1:]) for x in os.path.basename(events[i][1])[:-5].split("-"))
        synced = {p for kind, p in events[:i] if kind == "fsync"}
        chunks = [p for p in synced if f"/c/{e}/{s}/" in p or p.endswith(f"/c/{e}/{s}")]
        assert len({p.split("/resnet34/")[1].split("/")[0] for p in chunks}) == 5, (e, s, sorted(synced))


# ------------------------------------------------------------------ format 2 (the default): the same classes
# A format-2 group holds one packed array, `rows` (one chunk per unit), and for tail 'prior' the (C, C) `tail_prior`.
DUMP2 = ["--teacher", "smallcnn", "--recipe", "small", "--image-size", "28", "--topk", "3", "--epochs", "2",
         "--batch-size", "8", "--tail", "prior", "--prior-views", "8"]


@pytest.fixture(scope="module")
def clean2(small_shards, tmp_path_factory) -> pathlib.Path:
    out = dumped(small_shards, tmp_path_factory, "hostile2", DUMP2)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["logitcache"]["format_version"][0] == 2
    return out


@pytest.fixture
def cache2(clean2, tmp_path) -> pathlib.Path:
    return copied(clean2, tmp_path)


def test_format2_cache_trains_before_it_is_damaged(cache2, small_shards, tmp_path):
    """The baseline of the cases below: the undamaged format-2 cache (prior tail) verifies and trains."""
    assert cli("verify", cache2)[0] == 0
    rc, out = cli(*train_args(small_shards, cache2, tmp_path / "run"))
    assert rc == 0, out


@pytest.mark.parametrize("array, what, index", [
    ("rows", "shape", 0), ("rows", "shape", 1), ("rows", "shape", 3), ("rows", "chunk", 3),
    ("tail_prior", "shape", 0), ("tail_prior", "chunk", 1),
])
def test_format2_array_declaring_1e12(cache2, small_shards, tmp_path, array, what, index):
    def bomb(d):
        target = d["shape"] if what == "shape" else d["chunk_grid"]["configuration"]["chunk_shape"]
        target[index] = 10**12

    edit_json(cache2 / GROUP / array / "zarr.json", bomb)
    refused(cli_limited(*train_args(small_shards, cache2, tmp_path / "run")), f"{GROUP}/{array}", what)
    out = refused(cli("verify", cache2, "--json"), f"{GROUP}/{array}", "metadata")
    assert "do not decode" not in out and "unit (epoch" not in out
    refused(cli("info", cache2), f"{GROUP}/{array}")


@pytest.mark.parametrize("change, named", [
    ({"codec": {"name": "packed", "step_bits": "five", "knee": 0, "tail_samples": 0}}, "step_bits"),
    ({"codec": {"name": "evil", "step_bits": 5}}, "codec name"),
    ({"codec": {"name": "packed", "step_bits": 5, "knee": 0, "tail_samples": 10**12}}, "tail_samples"),
    ({"codec": {"name": "packed", "step_bits": 5, "knee": "wide", "tail_samples": 0}}, "knee"),
    ({"codec": {"name": "packed", "step_bits": 6, "knee": 0, "tail_samples": 0, "compressor": "zip"}}, "compressor"),
    # the rows array's zarr.json names lzma: a group that says blosc is refused, not decoded as blosc
    ({"codec": {"name": "packed", "step_bits": 6, "knee": 0, "tail_samples": 0, "compressor": "blosc"}}, "lzma"),
    ({"tail": {"name": "oracle"}}, "tail name"),
    ({"tail": {"name": "sampled", "m": "many"}}, "'m'"),
    ({"tail": {"name": "prior", "prior_views": -1}}, "prior_views"),
])
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_format2_mistyped_codec_or_tail(cache2, small_shards, tmp_path, change, named, command):
    logitcache_attrs(cache2 / GROUP / "zarr.json", **change)
    args = train_args(small_shards, cache2, tmp_path / "run") if command == "train" else [command, cache2]
    refused(cli(*args), "zarr.json", named)


def _rows_chunk(cache: pathlib.Path, e: int, s: int) -> pathlib.Path:
    """Unit (e, s)'s chunk object, after unsealing the group (`_marker`): a unit finished but not sealed, whose
    chunk object and marker these tests edit (damage inside a sealed pack: `flip_unit_byte`, tests/test_packs.py)."""
    unseal(cache, GROUP)
    return cache / GROUP / "rows" / f"c.{e}.{s}.0.0"


def test_format2_train_refuses_a_deleted_chunk(cache2, small_shards, tmp_path):
    _rows_chunk(cache2, 0, 1).unlink()
    out = refused(cli(*train_args(small_shards, cache2, tmp_path / "run")), "epoch 0, shard 1", "verify",
                  "--repair")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists(), out
    refused(cli("verify", cache2), "epoch 0, shard 1")


def test_format2_train_refuses_a_flipped_byte(cache2, small_shards, tmp_path):
    flip_unit_byte(cache2, GROUP, 1, 0, bit=0x40)  # in the unit's range of its sealed epoch's pack
    refused(cli(*train_args(small_shards, cache2, tmp_path / "run", "--epochs", "2")), "epoch 1, shard 0",
            "verify", "--repair")


def test_format2_train_refuses_a_damaged_prior(cache2, small_shards, tmp_path):
    """The prior is checked against the digest in the group metadata before any view uses it."""
    import zarr

    arr = zarr.open_array(str(cache2 / GROUP / "tail_prior"), mode="r+").with_config({"write_empty_chunks": True})
    prior = np.asarray(arr[...])
    prior[0] = np.roll(prior[0], 1)
    arr[...] = prior
    refused(cli(*train_args(small_shards, cache2, tmp_path / "run")), "prior")


def _lzma_filter(d, key, value):
    lz = next(c for c in d["codecs"] if c["name"] == "numcodecs.lzma")
    lz["configuration"]["filters"][0][key] = value


@pytest.mark.parametrize("edit, named", [
    # a 2 GiB dictionary would be allocated by the decoder; a literal context changes how every byte decodes
    (lambda d: _lzma_filter(d, "dict_size", 1 << 31), "lzma compressor"),
    (lambda d: _lzma_filter(d, "lc", 4), "lzma compressor"),
    (lambda d: d["codecs"][2]["configuration"].update(format=1), "lzma compressor"),  # an .xz container
    (lambda d: d["codecs"].__setitem__(1, {"name": "numcodecs.pickle"}), "not all in the allowed set"),
])
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_format2_rows_codecs_other_than_the_formats_lzma(cache2, small_shards, tmp_path, edit, named, command):
    """Format 2's rows array may name numcodecs' shuffle and lzma, and then only with the format's exact settings:
    anything else in its zarr.json is refused before zarr builds a codec from it."""
    edit_json(cache2 / GROUP / "rows" / "zarr.json", edit)
    args = train_args(small_shards, cache2, tmp_path / "run") if command == "train" else [command, cache2]
    refused(cli_limited(*args) if command == "train" else cli(*args), f"{GROUP}/rows", named)


def test_format2_train_refuses_an_inflating_lzma_chunk(cache2, small_shards, tmp_path):
    """A consistent forgery (checksums and the marker's sha256 updated): a unit's chunk is an lzma stream of 1 GiB
    of zeros (~150 KB stored). Training under an address-space limit refuses it naming the unit, without
    decoding past the unit's size."""
    import lzma

    import crc32c

    from logitcache.cache import schema

    payload = lzma.compress(bytes(1 << 30), format=schema.PACKED_LZMA_FORMAT,
                            filters=list(schema.PACKED_LZMA_FILTERS))
    _rows_chunk(cache2, 0, 1).write_bytes(payload + np.uint32(crc32c.crc32c(payload)).tobytes())
    marker = _marker(cache2, 0, 1)
    sha = hashlib.sha256(_rows_chunk(cache2, 0, 1).read_bytes()).hexdigest()
    edit_json(marker, lambda d: d["chunks"].update({"rows": sha}))
    out = refused(cli_limited(*train_args(small_shards, cache2, tmp_path / "run")), "epoch 0, shard 1",
                  "inflates past", "verify")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists(), out
    refused(cli("verify", cache2), "epoch 0, shard 1", "inflates past")


def test_format2_train_refuses_insane_codes(cache2, small_shards, tmp_path):
    """A consistent edit (valid codecs, the marker's sha256 updated): the top-1 class code of one row says 500 of
    10 classes. Only the value checks can tell; they name the unit."""
    import zarr

    from logitcache.cache.store import numcodecs_quietly

    chunk = _rows_chunk(cache2, 0, 1)  # unsealed: zarr edits the unit's own chunk object
    with numcodecs_quietly():  # the rows array's lzma codecs, built by zarr here rather than by the library
        arr = zarr.open_array(str(cache2 / GROUP / "rows"), mode="r+").with_config({"write_empty_chunks": True})
        codes = np.asarray(arr[0, 1])
        codes[0, 0] = 500  # field 0 = the top-1 class (FORMAT.md, format 2.0)
        arr[0, 1] = codes
    sha = hashlib.sha256(chunk.read_bytes()).hexdigest()
    edit_json(_marker(cache2, 0, 1), lambda d: d["chunks"].update({"rows": sha}))
    out = refused(cli(*train_args(small_shards, cache2, tmp_path / "run")), "epoch 0, shard 1", "[0, 10)", "verify")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists(), out
