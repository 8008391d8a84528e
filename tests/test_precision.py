"""Teacher precision as a recorded choice (issue 14): --teacher-precision on dump / online train / verify, the
group metadata and `info`, old groups read as what the dump did then, float32 reductions, and the tolerance of
`verify --recompute` taken from the measured error per precision (runtime/precision.py, FORMAT.md)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.cache.reader import CacheReader
from logitcache.cache.schema import GroupMeta, historical_teacher_precision
from logitcache.cli import main
from logitcache.dump import DumpConfig, dump
from logitcache.errors import CacheMismatchError
from logitcache.labels.topk import TopKLogits
from logitcache.runtime import precision
from logitcache.teacher import Teacher
from logitcache.train.config import TrainConfig


def _cfg(data, out, **kw):
    # format 1 keeps the true-class log-prob and lse as plain float32 arrays, so the precision of the teacher body
    # is measured here without format 2's quantisation (whose own bound verify adds: tests/test_codecs.py)
    base = dict(data=str(data), out=str(out), teacher="resnet18", recipe="imagenet", image_size=32, epochs=1, topk=5,
                batch_size=8, seed=7, progress=False, format=1)
    return DumpConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def two_precisions(imagenet_shards, tmp_path_factory):
    """One cache, the same views dumped by the same teacher at fp32 and at bf16 (CPU autocast)."""
    out = tmp_path_factory.mktemp("prec") / "cache.zarr"
    dump(_cfg(imagenet_shards, out, group="fp32", teacher_precision="fp32"))
    dump(_cfg(imagenet_shards, out, group="bf16", teacher_precision="bf16"))
    return out


def test_the_precision_is_recorded_and_shown(two_precisions):
    assert CacheReader(str(two_precisions), "bf16").meta.teacher_precision == "bf16"
    assert CacheReader(str(two_precisions), "fp32").meta.teacher_precision == "fp32"
    res = CliRunner().invoke(main, ["info", str(two_precisions), "--group", "bf16"])
    assert res.exit_code == 0, res.output
    assert "teacher body bf16, reductions float32" in res.output and "not recorded" not in res.output
    d = json.loads(CliRunner().invoke(main, ["info", str(two_precisions), "--json"]).output)
    assert d["groups"]["bf16"]["teacher_precision"] == "bf16" and d["groups"]["bf16"]["teacher_precision_recorded"]


def test_a_group_refuses_another_precision(imagenet_shards, two_precisions, tmp_path):
    with pytest.raises(CacheMismatchError, match="teacher_precision"):
        dump(_cfg(imagenet_shards, two_precisions, group="bf16", teacher_precision="fp32"))


def test_bf16_values_differ_from_fp32_within_the_measured_error(two_precisions):
    """The bf16 body really ran in bf16 (values differ), the reductions stayed float32 (stored lse and target
    log-prob are float32), and the difference is inside the error the table allows for bf16."""
    a, b = CacheReader(str(two_precisions), "fp32"), CacheReader(str(two_precisions), "bf16")
    worst = 0.0
    for e, s in sorted(a.markers()):
        ua, ub = a.read_unit(e, s), b.read_unit(e, s)
        assert ub.target_logprob.dtype == np.float32 and ub.lse.dtype == np.float32
        worst = max(worst, float(np.abs(ua.target_logprob - ub.target_logprob).max()))
    assert 0 < worst <= precision.MEASURED_ERROR["bf16"]


def test_a_group_from_before_the_field_reads_as_the_dump_then(two_precisions, tmp_path):
    """Old groups have no ``teacher_precision``: a CPU dump was fp32, a CUDA dump bf16 autocast; info says it
    was inferred."""
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(two_precisions, old)
    meta_file = old / "fp32" / "zarr.json"
    d = json.loads(meta_file.read_text())
    d["attributes"]["logitcache"].pop("teacher_precision")
    meta_file.write_text(json.dumps(d))
    meta = CacheReader(str(old), "fp32").meta
    assert meta.teacher_precision == "fp32" and not meta.teacher_precision_recorded
    res = CliRunner().invoke(main, ["info", str(old), "--group", "fp32"])
    assert "teacher body fp32" in res.output and "not recorded" in res.output
    assert historical_teacher_precision([{"command_line": "logitcache dump --device cuda:1 --teacher r"}]) == "bf16"
    assert historical_teacher_precision([{"command_line": "logitcache dump --device=cuda"}]) == "bf16"
    assert historical_teacher_precision([{"command_line": "logitcache dump --teacher cuda_net"}]) == "fp32"
    assert historical_teacher_precision([]) == "fp32"
    # written back by a rerun, the field is then recorded
    assert "teacher_precision" in GroupMeta.from_json(d["attributes"]["logitcache"]).to_json()


def test_verify_recomputes_at_the_cache_precision_with_the_tolerance_from_the_measurement(imagenet_shards,
                                                                                          two_precisions):
    res = CliRunner().invoke(main, ["verify", str(two_precisions), "--group", "bf16", "--data", str(imagenet_shards),
                                    "--recompute", "6", "--teacher", "resnet18", "--json"])
    assert res.exit_code == 0, res.output
    rc = json.loads(res.output)["recompute"]
    assert (rc["teacher_precision"], rc["cache_teacher_precision"]) == ("bf16", "bf16")
    assert rc["tolerance"] == pytest.approx(2 * precision.MEASURED_ERROR["bf16"])
    # an fp32 check of the bf16 cache: its own tolerance, and it passes
    res = CliRunner().invoke(main, ["verify", str(two_precisions), "--group", "bf16", "--data", str(imagenet_shards),
                                    "--recompute", "6", "--teacher", "resnet18", "--teacher-precision", "fp32",
                                    "--json"])
    rc = json.loads(res.output)["recompute"]
    assert res.exit_code == 0 and rc["teacher_precision"] == "fp32"
    assert rc["tolerance"] == pytest.approx(precision.MEASURED_ERROR["bf16"] + precision.MEASURED_ERROR["fp32"])
    assert 0 < rc["max_abs_logprob_diff"] <= rc["tolerance"]


def test_fp32_verify_of_an_fp32_cache_is_tight_and_still_catches_a_tiny_change(imagenet_shards, two_precisions,
                                                                                tmp_path):
    """fp32 vs fp32 on one machine: only float16 storage rounding separates them, so a 0.01-nat change to one
    stored true-class log-prob (far below bf16's error) is caught."""
    import shutil

    from logitcache.cache.verify import recompute_views

    rc = recompute_views(str(two_precisions), "fp32", str(imagenet_shards), "resnet18", None, 24)
    assert rc["mismatches"] == [] and rc["tolerance"] == pytest.approx(2 * precision.MEASURED_ERROR["fp32"])
    bad = tmp_path / "bad.zarr"
    shutil.copytree(two_precisions, bad)
    import zarr

    arr = zarr.open_group(str(bad / "fp32"), mode="r+")["target_logprob"]
    values = arr[0, 0]
    values[3] += 0.011
    arr[0, 0] = values
    # a consistent change (the marker's checksum updated too): readers refuse a chunk that differs from its
    # marker (issue 19), so only recomputing the view can tell this one
    import hashlib
    import json

    marker = bad / "fp32" / "units" / "e00000-s000000.json"
    m = json.loads(marker.read_text())
    m["chunks"]["target_logprob"] = hashlib.sha256((bad / "fp32" / "target_logprob" / "c" / "0" / "0" / "0")
                                                   .read_bytes()).hexdigest()
    marker.write_text(json.dumps(m))
    (bad / "fp32" / "unit_index" / "e00000.json").unlink()  # readers would use the epoch's index (issue 14) instead
    rc = recompute_views(str(bad), "fp32", str(imagenet_shards), "resnet18", None, 24)
    assert [(m["epoch"], m["shard"], m["offset"]) for m in rc["mismatches"]] == [(0, 0, 3)]


def test_the_teacher_runs_its_body_at_its_precision_and_returns_float32():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return torch.nn.functional.linear(x.flatten(1), torch.ones(3, x[0].numel()))

    for p, expected in (("fp32", False), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        t = Teacher(Probe(), [0.0] * 3, [1.0] * 3, "cpu", p)
        z = t.logits(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
        assert z.dtype == torch.float32 and seen[-1] == expected
    tk = TopKLogits.from_logits(torch.randn(4, 10).bfloat16(), torch.arange(4), 3)
    assert tk.lse.dtype == tk.target_logprob.dtype == tk.logits.dtype == torch.float32
    with pytest.raises(ValueError, match="--teacher-precision"):
        Teacher(Probe(), [0.0] * 3, [1.0] * 3, "cpu", "int8")


def test_fp32_on_a_gpu_means_no_tf32_and_evaluation_is_float32():
    """Flags only (no GPU here): the fp32 teacher and evaluation turn TF32 off inside and restore it after;
    neither is an autocast."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for ctx in (precision.teacher_autocast("fp32", "cuda:3"), precision.eval_autocast("cuda")):
            with ctx:
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                assert not torch.is_autocast_enabled("cuda")
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with warnings.catch_warnings():  # "CUDA is not available ... Disabling autocast": made, not entered
            warnings.simplefilter("ignore", UserWarning)
            assert isinstance(precision.teacher_autocast("bf16", "cuda"), torch.autocast)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_defaults_and_the_online_teacher():
    assert precision.default_teacher_precision("cuda:1") == "bf16"
    assert precision.default_teacher_precision("cpu") == "fp32"
    online = TrainConfig(data="d", out="o", student="s", loss="kd", teacher="t", device="cuda")
    assert online.teacher_precision == "bf16"  # resolved, so config.json records it
    assert TrainConfig.from_json(online.to_json()) == online
    assert TrainConfig(data="d", out="o", student="s", loss="kd", teacher="t",
                       teacher_precision="fp16").teacher_precision == "fp16"
    with pytest.raises(ValueError, match="online teacher"):
        TrainConfig(data="d", out="o", student="s", loss="ce", teacher_precision="bf16")
    with pytest.raises(ValueError, match="--teacher-precision"):
        DumpConfig(data="d", out="o", teacher="t", teacher_precision="fp8")


def test_the_tolerance_table_covers_storage_and_rounds_up():
    assert precision.round_up(0.4012) == 0.41 and precision.round_up(0.048) == 0.048
    assert precision.round_up(0.0481) == 0.049
    v = torch.tensor([-20.0, -0.5])
    assert torch.all(precision.storage_rounding(v, "float16") >= (v - v.half().double()).abs())
