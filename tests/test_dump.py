"""Stage 1 end to end on tiny synthetic ImageNet-style shards: bytes, resume, refusals, ranks, replay."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cache_edit import flip_unit_byte
from click.testing import CliRunner

from logitcache.cache.reader import CacheReader
from logitcache.cli import main
from logitcache.dump import KILL_AFTER_BATCHES_ENV, DumpConfig, dump
from logitcache.errors import CacheMismatchError, NonFiniteLogitsError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DUMP_ARGS = ["--teacher", "resnet18", "--recipe", "imagenet", "--image-size", "32", "--epochs", "2", "--topk", "5",
             "--temperatures", "1,4", "--batch-size", "3", "--seed", "7"]


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), teacher="resnet18", recipe="imagenet", image_size=32, epochs=2, topk=5,
                temperatures=(1.0, 4.0), batch_size=3, seed=7, progress=False)
    return DumpConfig(**{**base, **kw})


def store_bytes(url) -> dict[str, bytes]:
    """Every object of a cache except the group/root metadata and the run records, which hold provenance times."""
    root = Path(url)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not rel.endswith("zarr.json") and "/runs/" not in rel:
            out[rel] = p.read_bytes()
    for meta in ("zarr.json", "resnet18/zarr.json"):  # metadata: equal apart from provenance
        d = json.loads((root / meta).read_text())
        d.get("attributes", {}).get("logitcache", {}).pop("provenance", None)
        out[meta] = json.dumps(d, sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def reference_cache(imagenet_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache.zarr"
    summary = dump(_cfg(imagenet_shards, out))
    assert summary.units_written == 6 and summary.views_written == 48
    return out


def test_same_command_gives_the_same_bytes(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "again.zarr"
    dump(_cfg(imagenet_shards, out, workers=2))  # worker count does not change the bytes
    assert store_bytes(out) == store_bytes(reference_cache)


def test_cache_holds_what_the_teacher_saw(imagenet_shards, reference_cache):
    """Replay the cached views, rerun the teacher, compare: top-k, exact target log-prob (in or out of top-k)."""
    from logitcache.data.manifest import load_manifest
    from logitcache.data.shards import iter_shard
    from logitcache.teacher import Teacher
    from logitcache.views.recipe import Recipe, apply_view, sample_view
    from logitcache.views.rng import view_rng

    r = CacheReader(str(reference_cache))
    meta = r.meta
    recipe = Recipe.from_json(meta.recipe)
    teacher = Teacher.load("resnet18", None, 1000, 32, "cpu", seed=7,
                           normalization=(meta.normalization["mean"], meta.normalization["std"]))
    manifest = load_manifest(str(imagenet_shards))
    outside = 0
    for e in range(2):
        unit = r.read_unit(e, 1)
        samples = list(iter_shard(manifest, 1))
        xs = []
        for smp in samples:
            params = recipe.params_from_array(unit.view_params[smp.offset])
            # the cached params are the ones the dump sampled from (seed, epoch, index)
            _, h, w = smp.image.shape
            assert params == sample_view(view_rng(7, e, smp.index), h, w, recipe)
            xs.append(apply_view(smp.image, params, recipe))
        with torch.inference_mode():
            z = teacher.logits(torch.stack(xs))
        lp = torch.log_softmax(z, 1)
        labels = torch.tensor([s.label for s in samples])
        tk = r.topk_rows(unit, np.arange(len(samples)), labels)
        # format 2 (the default): log-probabilities within the codec's bound after normalising (2.5 steps)
        bound = 2.5 * meta.packed_codec().step + 1e-4
        np.testing.assert_array_equal(tk.indices.numpy(), torch.topk(z, 5).indices.numpy())
        np.testing.assert_allclose(tk.topk_log_probs(1.0).numpy(), torch.topk(lp, 5).values.numpy(), rtol=0,
                                   atol=bound)
        np.testing.assert_allclose(tk.target_log_probs(1.0).numpy(), lp.gather(1, labels[:, None])[:, 0].numpy(),
                                   rtol=0, atol=bound)
        outside += int((tk.indices != labels[:, None]).all(1).sum())
    assert outside > 0  # a random teacher is mostly wrong: the exact target log-prob was exercised


def test_kill_and_resume_equals_an_uninterrupted_dump(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [PY, "-m", "logitcache.cli", "dump", "--data", str(imagenet_shards), "--out", str(out), *DUMP_ARGS]
    env = {**os.environ, KILL_AFTER_BATCHES_ENV: "7"}  # mid-run: after 2 of 6 units, inside the third
    killed = subprocess.run(cmd, env=env, capture_output=True, cwd=REPO, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    done = CacheReader(str(out)).markers(refresh=True)
    assert 0 < len(done) < 6
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - len(done)} unit(s) written, {len(done)} already done" in resumed.stdout
    assert store_bytes(out) == store_bytes(reference_cache)


def test_rerun_with_other_settings_is_refused(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(reference_cache, out)
    args = [a if a != "5" else "8" for a in DUMP_ARGS]  # --topk 8
    res = CliRunner().invoke(main, ["dump", "--data", str(imagenet_shards), "--out", str(out), *args])
    assert res.exit_code != 0
    assert "k: cache has 5, requested 8" in res.output
    with pytest.raises(CacheMismatchError, match="seed: cache has 7, requested 8"):
        dump(_cfg(imagenet_shards, out, seed=8))


def test_more_epochs_add_units_and_keep_old_ones(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(reference_cache, out)
    before = store_bytes(out)
    summary = dump(_cfg(imagenet_shards, out, epochs=3))
    assert summary.units_written == 3 and summary.units_skipped_done == 6
    after = store_bytes(out)
    assert all(after[k] == v for k, v in before.items() if "/c/" in k or "/units/" in k)


def test_dry_run_writes_nothing(imagenet_shards, tmp_path):
    out = tmp_path / "none.zarr"
    res = CliRunner().invoke(main, ["dump", "--data", str(imagenet_shards), "--out", str(out), "--dry-run",
                                    "--json", *DUMP_ARGS])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["units"] == 6 and plan["views"] == 48 and plan["recipe"] == "imagenet@3"  # the newest version
    assert not out.exists()


def test_recipe_name_at_version_picks_an_older_version_or_refuses_clearly(imagenet_shards, tmp_path):
    out = tmp_path / "none.zarr"

    def dry(recipe):
        args = [a if a != "imagenet" else recipe for a in DUMP_ARGS]
        return CliRunner().invoke(main, ["dump", "--data", str(imagenet_shards), "--out", str(out), "--dry-run",
                                         "--json", *args])

    res = dry("imagenet@1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["recipe"] == "imagenet@1"
    for bad, why in (("imagenet@9", "version 9 cannot be replayed"), ("imagenet@x", "must be a number"),
                     ("nope@1", "unknown recipe")):
        res = dry(bad)
        assert res.exit_code != 0 and why in res.output and "Traceback" not in res.output, res.output


def test_nan_teacher_is_an_error_naming_the_sample(imagenet_shards, tmp_path):
    from logitcache.models.zoo import build_model

    model = build_model("resnet18", 1000)
    state = model.state_dict()
    state["fc.bias"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "nan.zarr"
    with pytest.raises(NonFiniteLogitsError, match=r"shard-000000\.tar:\w+"):
        dump(_cfg(imagenet_shards, out, weights=str(tmp_path / "nan.pt")))
    assert CacheReader(str(out)).markers(refresh=True) == {}  # nothing finished, nothing half-written read


def test_two_rank_torchrun_equals_one_rank(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "ddp.zarr"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "logitcache.cli",
           "dump", "--data", str(imagenet_shards), "--out", str(out), *DUMP_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert store_bytes(out) == store_bytes(reference_cache)


def test_info_and_verify_cli(reference_cache, imagenet_shards):
    res = CliRunner().invoke(main, ["info", str(reference_cache), "--json"])
    assert res.exit_code == 0, res.output
    g = json.loads(res.output)["groups"]["resnet18"]
    assert g["units_finished"] == 6 and g["views"] == 48 and g["k"] == 5
    assert g["provenance"][0]["command_line"]
    res = CliRunner().invoke(main, ["verify", str(reference_cache), "--data", str(imagenet_shards),
                                    "--recompute", "4", "--teacher", "resnet18", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ok"] and report["recompute"]["views"] == 4


def test_repair_redoes_exactly_the_damaged_unit(imagenet_shards, reference_cache, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(reference_cache, out)
    flip_unit_byte(out, "resnet18", 1, 2, bit=0xFF)  # inside the unit's range of its epoch's pack
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 1 and "unit (epoch 1, shard 2)" in res.output
    summary = dump(_cfg(imagenet_shards, out, repair=True))
    assert summary.units_written == 1
    assert store_bytes(out) == store_bytes(reference_cache)


def test_part_of_the_data_is_complete_for_its_shards_and_grows(imagenet_shards, tmp_path):
    from logitcache.cache.verify import cache_info, verify_cache

    out = tmp_path / "part.zarr"
    dump(_cfg(imagenet_shards, out, shards=(0, 2), epochs=1))
    assert verify_cache(str(out)).ok  # shard 1 was never asked for: not "unfinished"
    g = cache_info(str(out))["groups"]["resnet18"]
    assert g["shards"] == [0, 2] and g["units_total"] == g["units_finished"] == 2
    summary = dump(_cfg(imagenet_shards, out, shards=(1,), epochs=1))
    assert summary.units_written == 1
    g = cache_info(str(out))["groups"]["resnet18"]
    assert g["shards"] == [0, 1, 2] and g["units_finished"] == 3 and verify_cache(str(out)).ok


def test_same_weights_by_another_path_is_the_same_teacher(imagenet_shards, tmp_path, monkeypatch):
    from logitcache.models.zoo import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet18", 1000).state_dict(), tmp_path / "t.pt")
    out = tmp_path / "w.zarr"
    dump(_cfg(imagenet_shards, out, weights=str(tmp_path / "t.pt"), epochs=1, shards=(0,)))
    monkeypatch.chdir(tmp_path)
    summary = dump(_cfg(imagenet_shards, out, weights="t.pt", epochs=1, shards=(0, 1)))  # relative path
    assert summary.units_written == 1
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "other.pt")
    with pytest.raises(CacheMismatchError, match="weights_digest"):
        dump(_cfg(imagenet_shards, out, weights="other.pt", epochs=1))


def test_codec_flag_writes_that_coding_and_a_rerun_with_another_is_refused(imagenet_shards, tmp_path):
    out = tmp_path / "small.zarr"
    base = ["dump", "--data", str(imagenet_shards), "--out", str(out), *DUMP_ARGS]
    res = CliRunner().invoke(main, [*base, "--epochs", "1", "--codec", "packed-q4-knee4"])
    assert res.exit_code == 0, res.output
    meta = CacheReader(str(out)).meta
    assert meta.codec_name == "packed-q4-knee4"
    assert (meta.codec["step_bits"], meta.codec["knee"]) == (4, 4.0)
    res = CliRunner().invoke(main, [*base, "--epochs", "1"])  # the default coding: other bytes, refused
    assert res.exit_code != 0 and "codec" in res.output and "Traceback" not in res.output, res.output
    for bad, why in ((["--codec", "zstd"], "packed-q<B>"), (["--codec", "packed-q4-r6"], "-r"),
                     (["--format", "1", "--codec", "packed-q4"], "format 2's value coding")):
        res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "none.zarr"), "--dry-run", *bad])
        assert res.exit_code != 0 and why in res.output and "Traceback" not in res.output, (bad, res.output)
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "none.zarr"), "--dry-run", "--json",
                                    "--codec", "packed-q4-knee4-r2"])
    assert res.exit_code == 0 and json.loads(res.output)["codec"] == "packed-q4-knee4-r2", res.output
    assert not (tmp_path / "none.zarr").exists()
