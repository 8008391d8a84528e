"""The ``deit`` recipe end to end (issue 15): dump with the teacher on the MIXED views, replay, verify --recompute,
independence from workers/ranks/batch size, cached == online NKD on mixed views, and the replay digests that
refuse a changed resampler or decoder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.cache import verify as verify_mod
from logitcache.cache.reader import CacheReader
from logitcache.cache.verify import recompute_views, verify_cache
from logitcache.data.manifest import load_manifest
from logitcache.data.tar import tarfile_samples
from logitcache.dump import DumpConfig, dump
from logitcache.errors import CacheMismatchError, ReplayMismatchError
from logitcache.models.zoo import build_model
from logitcache.replay import CachedViews, FreshViews, cached_views_stage, collate
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.views import digest as digest_mod
from logitcache.views import recipe as recipe_mod
from logitcache.views.ops import mix as mix_op
from logitcache.views.recipe import get_recipe

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
SEED = 0


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    """A smallcnn whose classifier is scaled up: confident enough that mixing moves its log-probs by nats."""
    torch.manual_seed(11)
    model = build_model("smallcnn", 10)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("deit_teacher") / "smallcnn.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _dump_cfg(data, out, weights, **kw) -> DumpConfig:
    # k = C = 10: NKD reads the teacher at BOTH label columns of a mixed view, exactly only without a tail
    base = dict(data=str(data), out=str(out), teacher="smallcnn", weights=weights, recipe="deit", image_size=28,
                epochs=1, topk=10, temperatures=(1.0,), seed=SEED, batch_size=5, progress=False)
    return DumpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def deit_cache(small_shards, teacher_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("deit") / "cache.zarr"
    dump(_dump_cfg(small_shards, out, teacher_weights))
    return out


def _objects(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not rel.endswith("zarr.json") and "/runs/" not in rel:  # runs: provenance times
            out[rel] = p.read_bytes()
    return out


def _views(ds) -> dict[int, tuple]:
    return {int(it.index): (hashlib.sha256(it.image.numpy().tobytes()).hexdigest(), int(it.partner_target),
                            float(it.lam), it.view.tobytes()) for it in ds}


def test_deit_cache_bytes_do_not_depend_on_workers_or_batch_size(small_shards, deit_cache, teacher_weights,
                                                                   tmp_path):
    again = tmp_path / "again.zarr"
    dump(_dump_cfg(small_shards, again, teacher_weights, workers=2, batch_size=7))
    assert _objects(again) == _objects(deit_cache)
    meta = CacheReader(str(deit_cache)).meta
    assert meta.recipe["name"] == "deit" and meta.param_fields == get_recipe("deit").param_fields


def test_cached_views_are_the_dumped_mixed_views(small_shards, deit_cache):
    reader = CacheReader(str(deit_cache))
    cached = _views(CachedViews(small_shards, reader, epoch=0, return_items=True))
    fresh = _views(FreshViews(small_shards, seed=SEED, epoch=0, recipe=get_recipe("deit", 28), return_items=True))
    assert cached == fresh and len(cached) == 24
    r = get_recipe("deit", 28)
    modes = [mix_op.decode_mode(np.frombuffer(v[3], np.int16)[r.field_index("flags")], r.coded)
             for v in cached.values()]
    assert {1, 2} <= set(modes)  # both Mixup and CutMix occur
    assert any(v[2] < 1 for v in cached.values())
    # the public face: the mixed (C,) label that sums to 1
    image, row, target = next(iter(CachedViews(small_shards, reader, epoch=0)))
    assert target.shape == (10,) and math.isclose(float(target.sum()), 1.0, rel_tol=1e-6) and len(row) == 1


@pytest.mark.parametrize("name,version", [("deit", 2), ("tv-v2", 2), ("deit", 1), ("imagenet", 3), ("imagenet", 2),
                                        ("imagenet", 1)])
def test_views_do_not_depend_on_workers_or_ranks(small_shards, name, version):
    r = get_recipe(name, 28, version)

    def run(workers, rank, world):
        ds = FreshViews(small_shards, seed=3, epoch=1, recipe=r, rank=rank, world_size=world, return_items=True,
                        shuffle_seed=5)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        out = {}
        for b in loader:
            for i in range(len(b.target)):
                out[int(b.index[i])] = (hashlib.sha256(b.image[i].numpy().tobytes()).hexdigest(),
                                        int(b.partner_target[i]), float(b.lam[i]))
        return out

    one = run(0, 0, 1)
    assert len(one) == 24
    assert run(2, 0, 1) == one
    assert {**run(0, 0, 2), **run(2, 1, 2)} == one


def test_verify_recompute_agrees_on_the_mixed_views(small_shards, deit_cache, teacher_weights, monkeypatch):
    res = recompute_views(str(deit_cache), None, str(small_shards), "smallcnn", teacher_weights, 24)
    assert res["views"] == 24 and res["mismatches"] == [] and res["weights_digest_equal"]
    assert res["max_abs_logprob_diff"] <= res["tolerance"]
    rep = verify_cache(str(deit_cache), data=str(small_shards))
    assert rep.ok and rep.replay_units_checked == 2
    # control: the teacher on the UNmixed views (FKD's way) does not give the cached rows
    from logitcache.views.ops import mix as mix_mod
    monkeypatch.setattr(mix_mod, "apply_mix", lambda own, partner, *a: own.copy())
    unmixed = recompute_views(str(deit_cache), None, str(small_shards), "smallcnn", teacher_weights, 24)
    assert len(unmixed["mismatches"]) >= 12 and unmixed["max_abs_logprob_diff"] > 1.0


def test_cached_and_online_nkd_agree_on_mixed_views(small_shards, deit_cache, teacher_weights, tmp_path):
    common = dict(data=str(small_shards), student="smallcnn", loss="nkd", epochs=1, batch_size=24, lr=0.05,
                  seed=SEED, progress=False, label_smoothing=0.1, streams=1)  # one step
    train(TrainConfig(out=str(tmp_path / "cached"), cache=str(deit_cache), **common))
    train(TrainConfig(out=str(tmp_path / "online"), teacher="smallcnn", weights=teacher_weights, recipe="deit",
                      image_size=28, **common))
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][0]["train"]
            for d in ("cached", "online"))
    for term in ("ce", "nkd_target", "nkd_nontarget"):  # the stored rows are rounded (fp16, or format 2's steps)
        assert math.isclose(a[term], b[term], rel_tol=1e-2), term
    assert a["ce"] == b["ce"]  # the same mixed views and λ-mixed labels: CE is bit-identical


def test_mixed_ce_uses_lambda_mixed_targets(small_shards):
    from logitcache.losses.ce import cross_entropy
    from logitcache.views.mixing import mixed_targets

    batch = collate(list(FreshViews(small_shards, seed=1, epoch=0, recipe=get_recipe("deit", 28), return_items=True)))
    y = mixed_targets(batch.target, batch.partner_target, batch.lam, 10)
    logits = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(0))
    lp = torch.log_softmax(logits, 1)
    own, other = lp.gather(1, batch.target[:, None])[:, 0], lp.gather(1, batch.partner_target[:, None])[:, 0]
    expected = -(batch.lam * own + (1 - batch.lam) * other).mean()
    torch.testing.assert_close(cross_entropy(logits, y), expected.float())


@pytest.mark.parametrize("change", ["resampler", "decoder"])
def test_a_changed_resampler_or_decoder_makes_train_refuse_naming_versions(small_shards, deit_cache, tmp_path,
                                                                           monkeypatch, change):
    monkeypatch.setattr(verify_mod, "_REPLAY_CHECKED", set())
    if change == "resampler":  # a Pillow whose bicubic filter changed
        from PIL import Image
        monkeypatch.setitem(recipe_mod._RESAMPLE, recipe_mod._BICUBIC, Image.Resampling.BILINEAR)
        versions = {**digest_mod.library_versions(), "pillow": "99.0.0"}
    else:  # a decoder that rounds differently
        import logitcache.data.shards as shards_mod
        real = shards_mod.decode_sample

        def off_by_one(*a, **k):
            image, label = real(*a, **k)
            return image ^ 1, label
        monkeypatch.setattr(shards_mod, "decode_sample", off_by_one)
        versions = {**digest_mod.library_versions(), "decoder": "torchcodec"}
    monkeypatch.setattr(digest_mod, "library_versions", lambda: versions)
    cfg = TrainConfig(data=str(small_shards), out=str(tmp_path / "run"), student="smallcnn", loss="nkd",
                      cache=str(deit_cache), epochs=1, batch_size=8, progress=False)
    with pytest.raises(ReplayMismatchError) as e:
        train(cfg)
    msg = str(e.value)
    assert "not the pixels the teacher saw" in msg
    assert ("pillow: " in msg and "99.0.0 here" in msg) if change == "resampler" else "torchcodec here" in msg
    assert isinstance(e.value, CacheMismatchError)
    monkeypatch.setattr(verify_mod, "_REPLAY_CHECKED", set())
    with pytest.raises(ReplayMismatchError):
        CachedViews(small_shards, str(deit_cache), epoch=0)
    rep = verify_cache(str(deit_cache), data=str(small_shards))
    assert not rep.ok and any("not the pixels the teacher saw" in p["what"] for p in rep.problems)


def test_a_cache_of_another_recipe_version_is_refused(small_shards, deit_cache, tmp_path):
    with pytest.raises(CacheMismatchError, match="another recipe"):
        CachedViews(small_shards, str(deit_cache), epoch=0, recipe=get_recipe("tv-v2", 28))
    with pytest.raises(CacheMismatchError, match="mixup_alpha"):
        CachedViews(small_shards, str(deit_cache), epoch=0,
                    recipe=recipe_mod.Recipe.from_json({**get_recipe("deit", 28).to_json(), "mixup_alpha": 0.5}))


def test_webdataset_stage_replays_the_mixed_views(small_shards, deit_cache):
    wds = pytest.importorskip("webdataset", reason="the stage is for webdataset pipelines (ecosystem extra)")

    m = load_manifest(small_shards)
    stage = cached_views_stage(small_shards, deit_cache, epoch=0)
    pipeline = wds.DataPipeline(wds.SimpleShardList([m.shard_url(i) for i in range(len(m.shards))][::-1]),
                                tarfile_samples, stage, wds.to_tuple("image", "soft", "target", "index"))
    ours = {int(i): (img, t) for img, _, t, i in pipeline}
    ref = CachedViews(small_shards, str(deit_cache), epoch=0, return_index=True)
    n = 0
    for img, _, t, i in ref:
        assert torch.equal(ours[int(i)][0], img) and torch.equal(ours[int(i)][1], t)
        n += 1
    assert n == len(ours) == 24


def test_two_rank_torchrun_deit_dump_equals_one_rank(small_shards, deit_cache, teacher_weights, tmp_path):
    out = tmp_path / "ddp.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "logitcache.cli", "dump", "--data", str(small_shards), "--out", str(out), "--teacher", "smallcnn",
           "--weights", teacher_weights, "--recipe", "deit", "--image-size", "28", "--epochs", "1", "--topk", "10",
           "--temperatures", "1", "--batch-size", "3", "--seed", str(SEED)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _objects(out) == _objects(deit_cache)  # ranks and batch size change nothing, markers included


def test_tv_v2_end_to_end(small_shards, teacher_weights, tmp_path):
    out = tmp_path / "tv.zarr"
    dump(_dump_cfg(small_shards, out, teacher_weights, recipe="tv-v2"))
    cached = _views(CachedViews(small_shards, str(out), epoch=0, return_items=True))
    fresh = _views(FreshViews(small_shards, seed=SEED, epoch=0, recipe=get_recipe("tv-v2", 28), return_items=True))
    assert cached == fresh and len(cached) == 24 and any(v[2] < 1 for v in cached.values())
    res = recompute_views(str(out), None, str(small_shards), "smallcnn", teacher_weights, 8)
    assert res["views"] == 8 and res["mismatches"] == []


def test_a_version_1_cache_still_replays_byte_exactly(small_shards, teacher_weights, tmp_path, monkeypatch):
    """Caches dumped before ``deit`` v2 keep replaying with v1's params (stored seed and partner), and verify
    --recompute agrees with them; v2 is what a dump makes now."""
    out = tmp_path / "v1.zarr"
    monkeypatch.setitem(recipe_mod._NEWEST, "deit", 1)  # what a dump made before v2 existed
    dump(_dump_cfg(small_shards, out, teacher_weights))
    monkeypatch.undo()
    reader = CacheReader(str(out))
    assert reader.meta.recipe["version"] == 1 and get_recipe("deit").version == 2
    cached = _views(CachedViews(small_shards, reader, epoch=0, return_items=True))
    fresh = _views(FreshViews(small_shards, seed=SEED, epoch=0, recipe=get_recipe("deit", 28, 1),
                              return_items=True))
    assert cached == fresh and len(cached) == 24
    assert verify_cache(str(out), data=str(small_shards)).ok  # the replay digests of v1 views
    res = recompute_views(str(out), None, str(small_shards), "smallcnn", teacher_weights, 12)
    assert res["views"] == 12 and res["mismatches"] == []
    with pytest.raises(CacheMismatchError):
        CachedViews(small_shards, str(out), epoch=0, recipe=get_recipe("deit", 28))


def test_two_rank_training_with_deit_sees_the_one_process_views(small_shards, tmp_path):
    """A 2-rank torchrun (gloo, CPU) training run with ``--recipe deit`` against the 1-process run: the same sample
    accounting (every sample once per epoch, lockstep at the planned steps) and the same mixed views and λ-mixed
    targets. Batch 1 per rank and a vanishing learning rate make each view's loss depend on that view alone
    (BatchNorm over one image, weights that do not move), so the epoch's mean CE and top-1 agree only if every
    view — pixels, partner and λ — is the 1-process run's."""
    from logitcache.data.manifest import load_manifest
    from logitcache.replay import DEFAULT_STREAMS
    from logitcache.train.lockstep import planned_steps

    def run(out, nproc):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                  if nproc > 1 else [sys.executable])
        cmd = [*launch, "-m", "logitcache.cli", "train", "--data", str(small_shards), "--val", str(small_shards),
               "--out", str(out), "--student", "smallcnn", "--loss", "ce", "--label-smoothing", "0.1",
               "--recipe", "deit", "--image-size", "28", "--epochs", "2", "--batch-size", "1", "--lr", "1e-9",
               "--seed", str(SEED), "--no-progress"]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             cwd=Path(__file__).resolve().parents[1], timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    ddp, one = run(tmp_path / "ddp", 2), run(tmp_path / "one", 1)
    m = load_manifest(small_shards)
    for lines, world in ((ddp, 2), (one, 1)):
        assert [x["epoch"] for x in lines] == [0, 1]
        assert all(x["train"]["samples"] == 24 and x["train"]["samples_skipped"] == 0 and x["val"]["n"] == 24
                   for x in lines)
        assert lines[-1]["step"] == sum(planned_steps(m, [0, 1], SEED, e, world, 1, DEFAULT_STREAMS) for e in (0, 1))
    for a, b in zip(ddp, one, strict=True):
        assert math.isclose(a["train"]["ce"], b["train"]["ce"], rel_tol=1e-5), (a["train"], b["train"])
        assert a["train"]["top1"] == b["train"]["top1"]
    assert ddp[0]["train"]["ce"] != ddp[1]["train"]["ce"]  # epoch 1 draws other views (and partners)


def test_pskd_refuses_a_mixing_recipe_naming_it(small_shards, tmp_path):
    """PS-KD's target for a sample is its own previous-epoch prediction; a mixed view's prediction belongs to two
    samples, so PS-KD with ``deit`` / ``tv-v2`` is refused before training (CLI: a message, no traceback)."""
    from click.testing import CliRunner

    from logitcache.cli import main
    from logitcache.errors import RecipeError

    for name in ("deit", "tv-v2"):
        with pytest.raises(RecipeError, match=f"--loss pskd cannot train on recipe '{name}'.*two samples"):
            train(TrainConfig(data=str(small_shards), out=str(tmp_path / name), student="smallcnn", loss="pskd",
                              recipe=name, image_size=28, epochs=1, batch_size=4, progress=False))
    res = CliRunner().invoke(main, ["train", "--data", str(small_shards), "--out", str(tmp_path / "cli"),
                                    "--student", "smallcnn", "--loss", "pskd", "--recipe", "deit", "--image-size",
                                    "28", "--epochs", "1", "--no-progress"])
    assert res.exit_code != 0 and "recipe 'deit'" in res.output and "Traceback" not in res.output
    # without mixing PS-KD runs as before
    train(TrainConfig(data=str(small_shards), out=str(tmp_path / "small"), student="smallcnn", loss="pskd",
                      recipe="small", epochs=1, batch_size=12, progress=False))


def test_a_sample_the_dump_skips_leaves_its_partner_unmixed_and_replay_agrees(teacher_weights, tmp_path):
    """deit v2 derives partners from the unit: a corrupt sample skipped by the dump is nobody's partner — the view
    whose cycle partner it was is stored unmixed — and replay, fresh views and verify --recompute agree."""
    from _data_helpers import make_png_gray

    from logitcache.data.write import write_shards

    rng = np.random.default_rng(3)
    samples = [(f"s{i:03d}", {"png": make_png_gray(rng), "cls": str(i % 10).encode()}) for i in range(12)]
    samples[4] = ("s004", {"png": b"not a png", "cls": b"4"})
    write_shards(iter(samples), tmp_path / "data", class_names=[str(c) for c in range(10)], samples_per_shard=12)
    out = tmp_path / "cache.zarr"
    dump(_dump_cfg(tmp_path / "data", out, teacher_weights, skip_bad=True))
    reader = CacheReader(str(out))
    assert reader.markers()[(0, 0)].skipped == (4,)
    cached = _views(CachedViews(tmp_path / "data", reader, epoch=0, skip_bad=True, return_items=True))
    fresh = _views(FreshViews(tmp_path / "data", seed=SEED, epoch=0, recipe=get_recipe("deit", 28), skip_bad=True,
                              return_items=True))
    assert cached == fresh and sorted(cached) == [i for i in range(12) if i != 4]
    orphan = next(o for o, p in mix_op.cycle_partners(SEED, 0, 0, 0, 16, 12).items() if p == 4)
    assert cached[orphan][2] == 1.0 and cached[orphan][1] == orphan % 10  # not mixed: own label, λ 1
    assert all(v[1] != 4 for v in cached.values())  # nobody mixes with the skipped sample
    res = recompute_views(str(out), None, str(tmp_path / "data"), "smallcnn", teacher_weights, 11)
    assert res["views"] == 11 and res["mismatches"] == []
