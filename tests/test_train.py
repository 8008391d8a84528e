"""`logitcache train` end to end on tiny shards: every mode, one soft-label source, refusals, PS-KD's store,
cached == online NKD, resume equality (in process and after a real SIGKILL), and a 2-process DDP run."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from logitcache.cache.reader import CacheReader
from logitcache.cache.verify import cache_info, verify_cache
from logitcache.cli import main
from logitcache.dump import DumpConfig, dump
from logitcache.errors import LogitcacheError, TemperatureNotRecorded
from logitcache.models.weights import load_checkpoint
from logitcache.models.zoo import build_model
from logitcache.replay import DEFAULT_STREAMS
from logitcache.train.config import TrainConfig, learning_rate
from logitcache.train.lockstep import planned_steps
from logitcache.train.loop import KILL_AFTER_STEPS_ENV, train

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SEED = 3


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("teacher") / "smallcnn.pt"
    torch.save(build_model("smallcnn", 10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cache(small_shards, teacher_weights, tmp_path_factory):
    """A smallcnn teacher over small_shards: 2 epochs, k = C = 10 (no tail), temperatures 1 and 4."""
    out = tmp_path_factory.mktemp("train_cache") / "cache.zarr"
    dump(DumpConfig(data=str(small_shards), out=str(out), teacher="smallcnn", weights=str(teacher_weights),
                    recipe="small", epochs=2, topk=10, temperatures=(1.0, 4.0), seed=SEED, batch_size=8,
                    progress=False, codec="packed-q14"))  # k = C: a fine step keeps the rows exact to ~1e-4
    return out


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), val=str(data), out=str(out), student="smallcnn", loss="ce", epochs=1, batch_size=5,
                lr=0.05, seed=SEED, progress=False)
    if not kw.get("cache"):
        base["recipe"] = "small"
    return TrainConfig(**{**base, **kw})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run) / "checkpoints" / "last.pt")["model"]


def losses(line) -> dict[str, float]:
    return {k: v for k, v in line["train"].items() if k not in ("seconds", "images_per_s")}


def scores(line) -> dict[str, float]:
    return {k: v for k, v in line["val"].items() if k not in ("seconds", "images_per_s")}


MODES = [
    ("ce", {}, {"ce"}),
    ("kd", {"cache": True}, {"ce", "kd"}),
    ("dkd", {"cache": True}, {"ce", "dkd_tckd", "dkd_nckd"}),
    ("nkd", {"cache": True}, {"ce", "nkd_target", "nkd_nontarget"}),
    ("nkd", {"teacher": True}, {"ce", "nkd_target", "nkd_nontarget"}),
    ("tf-nkd", {}, {"ce", "tf_nkd"}),
    ("uskd", {}, {"ce", "uskd_target", "uskd_nontarget", "uskd_weak"}),
    ("zipf-ls", {}, {"ce", "zipf_ls"}),
]


@pytest.mark.parametrize(("loss", "source", "terms"), MODES, ids=[f"{m[0]}-{'-'.join(m[1]) or 'free'}" for m in MODES])
def test_each_mode_trains_end_to_end(small_shards, cache, teacher_weights, tmp_path, loss, source, terms):
    kw = {}
    if source.get("cache"):
        kw["cache"] = str(cache)
    if source.get("teacher"):
        kw.update(teacher="smallcnn", weights=str(teacher_weights))
    run = tmp_path / "run"
    train(cfg(small_shards, run, loss=loss, **kw))
    (line,) = metrics(run)
    assert set(line["train"]) >= terms | {"loss", "top1", "samples", "samples_skipped", "images_per_s"}
    assert math.isclose(line["train"]["loss"], sum(line["train"][t] for t in terms), rel_tol=1e-9)
    assert all(math.isfinite(line["train"][t]) for t in terms)
    assert line["train"]["samples"] == 24 and line["train"]["samples_skipped"] == 0
    assert line["val"]["n"] == 24 and 0 <= line["val"]["top1"] <= 1
    assert line["cache_epoch"] == (0 if kw.get("cache") else None)
    ckpt = load_checkpoint(run / "checkpoints" / "epoch-0000.pt")  # weights_only=True inside
    # 2 shards of 12 samples: 2 streams, each in batches of 5, 5, 2
    assert json.loads(ckpt["config"])["loss"] == loss and ckpt["epoch_complete"] and ckpt["step"] == 6
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["mode"] == TrainConfig.from_json(_config_only(config)).mode
    assert config["provenance"][0]["end_time"] and config["samples_skipped_per_epoch"] == {"0": 0}
    assert json.loads((run / "val_reliability.json").read_text())
    if loss == "uskd":
        assert any(k.startswith("weak_head.") for k in ckpt["model"])
    if loss == "zipf-ls":
        assert config["resolved"]["zipf_votes"] == "logits" and any("votes=None" in n for n in
                                                                     config["resolved"]["notes"])


def _config_only(config: dict) -> dict:
    from dataclasses import fields

    return {f.name: config[f.name] for f in fields(TrainConfig)}


def test_pskd_learns_from_last_epochs_predictions_kept_in_the_store(small_shards, tmp_path):
    """Epoch 0 of PS-KD is CE exactly (no previous predictions); epoch 1 reads epoch 0's from RUN/pskd.zarr."""
    train(cfg(small_shards, tmp_path / "ce", loss="ce", epochs=3))
    train(cfg(small_shards, tmp_path / "pskd", loss="pskd", epochs=3))
    ce, ps = metrics(tmp_path / "ce"), metrics(tmp_path / "pskd")
    assert math.isclose(ps[0]["train"]["pskd"], ce[0]["train"]["ce"], rel_tol=1e-12)
    assert abs(ps[1]["train"]["pskd"] - ce[1]["train"]["ce"]) > 1e-6
    store = CacheReader(str(tmp_path / "pskd" / "pskd.zarr"), "pskd")
    markers = store.markers()
    assert set(markers) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # two slots, used alternately
    assert {m.stats["train_epoch"] for (slot, _), m in markers.items() if slot == 0} == {2.0}
    assert {m.stats["train_epoch"] for (slot, _), m in markers.items() if slot == 1} == {1.0}
    assert store.meta.k == 10 and store.meta.value_dtype == "float32"
    rows = store.rows(2, list(range(24)), [i % 10 for i in range(24)])[0]
    torch.testing.assert_close(rows.probs().sum(1), torch.ones(24, dtype=torch.float32))


def test_cached_and_online_nkd_agree_on_the_first_step(small_shards, cache, teacher_weights, tmp_path):
    """Same seed, one step per epoch: the cache's fp16 rows give the online teacher's loss terms."""
    common = dict(loss="nkd", batch_size=24, epochs=1, loss_args=("temperature=4",), streams=1)  # one step
    train(cfg(small_shards, tmp_path / "cached", cache=str(cache), **common))
    train(cfg(small_shards, tmp_path / "online", teacher="smallcnn", weights=str(teacher_weights), **common))
    (a,), (b,) = metrics(tmp_path / "cached"), metrics(tmp_path / "online")
    for term in ("ce", "nkd_target", "nkd_nontarget"):
        assert math.isclose(a["train"][term], b["train"][term], rel_tol=2e-3), term
    assert a["train"]["ce"] == b["train"]["ce"]  # the same views and the same student: CE is bit-identical


def test_a_format_1_cache_still_trains_verifies_and_grows(small_shards, teacher_weights, tmp_path):
    """Written by the format-1 writer path (kept for that purpose, and for PS-KD's store)."""
    out = str(tmp_path / "v1.zarr")
    common = dict(data=str(small_shards), out=out, teacher="smallcnn", weights=str(teacher_weights), recipe="small",
                  topk=3, temperatures=(1.0, 4.0), seed=SEED, batch_size=8, progress=False)
    dump(DumpConfig(epochs=1, format=1, **common))
    r = CacheReader(out)
    assert r.root_meta.format_version == (1, 0) and not r.meta.packed and r.meta.value_dtype == "float16"
    assert verify_cache(out).ok
    info = cache_info(out)["groups"]["smallcnn"]
    assert info["format"] == "1.0" and info["codec"] == "arrays-float16" and info["objects_per_unit"] == 6
    train(cfg(small_shards, tmp_path / "run", loss="nkd", cache=out))
    (line,) = metrics(tmp_path / "run")
    assert all(math.isfinite(line["train"][t]) for t in ("nkd_target", "nkd_nontarget"))
    dump(DumpConfig(epochs=2, **common))  # more epochs later: the cache keeps its format
    assert CacheReader(out).root_meta.format_version == (1, 0) and verify_cache(out).ok
    with pytest.raises(ValueError, match="uniform tail"):
        DumpConfig(epochs=1, format=1, tail="prior", **common)


@pytest.mark.parametrize("tail", ["uniform", "prior", "sampled:3"])
def test_format_2_tails_dump_verify_and_train(small_shards, teacher_weights, tmp_path, tail):
    out = str(tmp_path / "c.zarr")
    dump(DumpConfig(data=str(small_shards), out=out, teacher="smallcnn", weights=str(teacher_weights), recipe="small",
                    epochs=1, topk=3, temperatures=(1.0, 4.0), seed=SEED, batch_size=8, progress=False, tail=tail,
                    prior_views=12))
    r = CacheReader(out)
    assert r.root_meta.format_version == (2, 0) and r.meta.tail_name == tail.split(":")[0]
    assert r.tail.key.split(":")[0] == tail.split(":")[0]
    if tail == "prior":  # 12 calibration views -> the first shard(s) of epoch 0; the prior is checked on reading
        assert r.meta.tail["prior_views"] == 12 and r.meta.tail_prior_digest
    assert verify_cache(out).ok
    info = cache_info(out)["groups"]["smallcnn"]
    assert info["format"] == "2.0" and info["codec"] == "packed-q6" and info["tail"] == tail.split(":")[0]
    # sealed: the epoch's one pack (+ the prior's chunk) for its 2 units
    assert info["objects_per_unit"] == (1 + (tail == "prior")) / 2
    rows, _ = r.rows(0, list(range(24)), [0] * 24)
    assert torch.isfinite(rows.log_probs(1.0)).all() and torch.isfinite(rows.log_probs(4.0)).all()
    train(cfg(small_shards, tmp_path / "run", loss="nkd", cache=out))
    (line,) = metrics(tmp_path / "run")
    assert all(math.isfinite(line["train"][t]) for t in ("nkd_target", "nkd_nontarget"))


def test_impossible_combinations_are_refused(small_shards, cache, tmp_path):
    with pytest.raises(ValueError, match="loss 'kd' distils a teacher: give --cache"):
        cfg(small_shards, tmp_path, loss="kd")
    with pytest.raises(ValueError, match="--cache or --teacher, not both"):
        cfg(small_shards, tmp_path, loss="nkd", cache=str(cache), teacher="smallcnn")
    with pytest.raises(ValueError, match="loss 'uskd' is teacher-free and would ignore --cache"):
        cfg(small_shards, tmp_path, loss="uskd", cache=str(cache))
    with pytest.raises(ValueError, match="has no argument 'gamm'"):
        cfg(small_shards, tmp_path, loss="nkd", cache=str(cache), loss_args=("gamm=2",))
    with pytest.raises(TemperatureNotRecorded, match=r"temperature\(s\) \[2.0\].*has \[1.0, 4.0\]"):
        train(cfg(small_shards, tmp_path / "r", loss="kd", cache=str(cache), loss_args=("temperature=2",)))
    res = CliRunner().invoke(main, ["train", "--data", str(small_shards), "--out", str(tmp_path / "cli"),
                                    "--student", "smallcnn", "--loss", "dkd", "--recipe", "small"])
    assert res.exit_code != 0 and "loss 'dkd' distils a teacher" in res.output
    res = CliRunner().invoke(main, ["train", "--data", str(small_shards), "--out", str(tmp_path / "cli"),
                                    "--student", "smallcnn", "--loss", "nkd", "--cache", str(cache),
                                    "--recipe", "small", "--image-size", "32"])
    assert res.exit_code != 0 and "--image-size 32, but cache" in res.output and "28 px" in res.output


def test_an_existing_run_needs_resume(small_shards, tmp_path):
    train(cfg(small_shards, tmp_path / "run"))
    with pytest.raises(LogitcacheError, match="already holds a run.*--resume"):
        train(cfg(small_shards, tmp_path / "run"))
    with pytest.raises(LogitcacheError, match=r"(?s)another configuration.*lr: checkpoint has 0.05, now 0.1"):
        train(cfg(small_shards, tmp_path / "run", resume=True, lr=0.1, epochs=2))


def test_resume_after_an_epoch_equals_an_uninterrupted_run(small_shards, cache, tmp_path):
    common = dict(loss="nkd", cache=str(cache), epochs=3, warmup_epochs=1)  # 3 > 2 cached epochs: views cycle
    train(cfg(small_shards, tmp_path / "full", **common))
    train(cfg(small_shards, tmp_path / "part", **common), stop_after_epochs=1)
    assert len(metrics(tmp_path / "part")) == 1
    train(cfg(small_shards, tmp_path / "part", resume=True, **common))
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [losses(m) for m in full] == [losses(m) for m in part]
    assert [scores(m) for m in full] == [scores(m) for m in part]
    assert [m["cache_epoch"] for m in part] == [0, 1, 0]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert [p["resumed_from"] for p in config["provenance"]] == [None, {"epoch": 1, "batches": 0}]
    assert any("replays them cyclically" in n for n in config["resolved"]["notes"])


def _train_subprocess(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([PY, "-m", "logitcache.cli", "train", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(small_shards, tmp_path):
    """PS-KD (its store, and its rows awaiting their unit, travel in the checkpoint), a real SIGKILL in the middle
    of epoch 1, checkpoints every step: the resumed run ends with the uninterrupted run's weights and losses."""
    args = ["--data", str(small_shards), "--student", "smallcnn", "--loss", "pskd",
            "--epochs", "2", "--batch-size", "5", "--lr", "0.05", "--seed", str(SEED), "--recipe", "small",
            "--workers", "1", "--checkpoint-every", "1", "--no-progress"]
    killed = _train_subprocess([*args, "--out", str(tmp_path / "killed")], {KILL_AFTER_STEPS_ENV: "7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    # 6 steps an epoch (2 streams of 12 samples in batches of 5, 5, 2): step 7 is the 2nd of epoch 1
    assert (ckpt["epoch"], ckpt["batches_done"], ckpt["epoch_complete"], ckpt["step"]) == (1, 1, False, 7)
    assert ckpt["ranks"][0]["pskd"]["epoch"] == 1  # rows awaiting their unit went into the checkpoint
    resumed = _train_subprocess([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same float reductions
    try:
        train(cfg(small_shards, tmp_path / "full", val=None, loss="pskd", epochs=2, workers=1, checkpoint_every=1))
    finally:
        torch.set_num_threads(threads)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_lines, resumed_lines = metrics(tmp_path / "full"), metrics(tmp_path / "killed")
    assert [losses(m) for m in full_lines] == [losses(m) for m in resumed_lines]


def test_two_process_ddp_counts_every_sample_once(imagenet_shards, tmp_path):
    """3 shards on 2 ranks (16 vs 8 samples): the ranks stay in lockstep, train on all 24 samples and
    evaluate each validation sample once."""
    out = tmp_path / "ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "logitcache.cli",
           "train", "--data", str(imagenet_shards), "--val", str(imagenet_shards), "--out", str(out),
           "--student", "smallcnn", "--loss", "tf-nkd", "--recipe", "imagenet", "--image-size", "32",
           "--epochs", "2", "--batch-size", "4", "--seed", str(SEED), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1]
    for m in lines:
        assert m["train"]["samples"] == 24 and m["train"]["samples_skipped"] == 0
        assert m["val"]["n"] == 24
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 * planned_steps_for(imagenet_shards, 2, 4)
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2


def planned_steps_for(data, world, batch_size):
    from logitcache.data.manifest import load_manifest

    m = load_manifest(data)
    return planned_steps(m, [0, 1, 2], SEED, 0, world, batch_size, DEFAULT_STREAMS)


def test_label_smoothing_on_ce_is_the_ls_loss(small_shards, tmp_path):
    train(cfg(small_shards, tmp_path / "ce", loss="ce", label_smoothing=0.1))
    train(cfg(small_shards, tmp_path / "ls", loss="ls", loss_args=("epsilon=0.1",)))
    (a,), (b,) = metrics(tmp_path / "ce"), metrics(tmp_path / "ls")
    assert math.isclose(a["train"]["ce"], b["train"]["ls"], rel_tol=1e-6)
    assert a["val"]["nll"] == pytest.approx(b["val"]["nll"], rel=1e-6)


def test_learning_rate_schedules():
    c = TrainConfig(data="d", out="o", student="s", epochs=10, lr=1.0, warmup_epochs=2)
    assert learning_rate(c, 0.0, 0.5) == pytest.approx(0.25) and learning_rate(c, 1.5, 0.5) == pytest.approx(1.0)
    assert learning_rate(c, 2.0, 0.5) == pytest.approx(1.0) and learning_rate(c, 6.0, 0.5) == pytest.approx(0.5)
    assert learning_rate(c, 9.99, 0.01) < 1e-3
    s = TrainConfig(data="d", out="o", student="s", epochs=10, lr=1.0, schedule="step", step_milestones=(3, 6))
    assert [learning_rate(s, t, 0.1) for t in (0, 2.9, 3, 6.5)] == pytest.approx([1, 1, 0.1, 0.01])
    d = TrainConfig(data="d", out="o", student="s", epochs=8, lr=1.0, schedule="step")
    assert [learning_rate(d, t, 0.1) for t in (3.9, 4, 6)] == pytest.approx([1, 0.1, 0.01])


def test_config_round_trips_through_json_and_validates():
    c = TrainConfig(data="d", out="o", student="s", loss="nkd", teacher="t", loss_args=["gamma=2"], shards=[0, 2],
                    step_milestones=[3])
    assert TrainConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    for bad, match in [(dict(epochs=0), "--epochs"), (dict(optimizer="lamb"), "--optimizer"),
                       (dict(warmup_epochs=5, epochs=5), "--warmup-epochs"), (dict(loss="nope"), "unknown loss"),
                       (dict(loss="pskd", label_smoothing=0.1), "which loss 'pskd' replaces"),
                       (dict(weights="w.pt"), "--weights are the teacher's")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{"data": "d", "out": "o", "student": "s", **bad})
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_json({**c.to_json(), "bogus": 1})


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    """One undecodable sample: the dump skips it (its cache row is padding), cached NKD and PS-KD (whose store
    then lacks that row) train on the other 11 and count the skip in metrics.jsonl and config.json."""
    import numpy as np
    from _data_helpers import make_png_gray

    from logitcache.data.write import write_shards
    from logitcache.errors import BadSampleError

    rng = np.random.default_rng(5)
    samples = [(f"s{i:03d}", {"png": make_png_gray(rng), "cls": str(i % 10).encode()}) for i in range(12)]
    samples[7] = ("s007", {"png": b"\x89PNG broken", "cls": b"7"})
    data = tmp_path / "data"
    write_shards(iter(samples), data, class_names=[str(c) for c in range(10)], samples_per_shard=6)
    dump(DumpConfig(data=str(data), out=str(tmp_path / "c.zarr"), teacher="smallcnn", recipe="small", epochs=1,
                    topk=10, seed=SEED, skip_bad=True, progress=False))
    for name, kw in (("nkd", dict(loss="nkd", cache=str(tmp_path / "c.zarr"))), ("pskd", dict(loss="pskd"))):
        run = tmp_path / name
        train(cfg(data, run, val=None, epochs=2, skip_bad=True, **kw))
        for line in metrics(run):
            assert (line["train"]["samples"], line["train"]["samples_skipped"]) == (11, 1)
            assert math.isfinite(line["train"]["loss"])
        assert json.loads((run / "config.json").read_text())["samples_skipped_per_epoch"] == {"0": 1, "1": 1}
    with pytest.raises(BadSampleError, match=r"shard-000001\.tar:s007"):
        train(cfg(data, tmp_path / "strict", val=None, loss="ce"))
