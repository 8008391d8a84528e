"""`logitcache.evaluate` and `logitcache eval`: metrics over a dataset, checkpoint loading, DDP merging."""

from __future__ import annotations

import datetime
import json
import math
import shutil
import tarfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from logitcache.cli import main
from logitcache.data.manifest import load_manifest
from logitcache.data.shards import iter_shard
from logitcache.errors import BadSampleError, UnsafeCheckpointError
from logitcache.eval.evaluate import evaluate, load_model_for_eval, paper_units
from logitcache.eval.metrics import ClassificationMetrics
from logitcache.models.weights import load_checkpoint
from logitcache.models.zoo import attach_weak_head, build_model, model_normalization
from logitcache.views.ops.geometry import normalize
from logitcache.views.recipe import eval_view, get_recipe

NUM_CLASSES = 10
RECIPE = get_recipe("small", 28)
NORM = model_normalization("smallcnn")


def _eval_inputs(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's normalised eval view and label, read independently of `evaluate`."""
    manifest = load_manifest(data)
    images, labels = [], []
    for s in range(len(manifest.shards)):
        for sample in iter_shard(manifest, s):
            images.append(eval_view(sample.image, RECIPE))
            labels.append(sample.label)
    return normalize(torch.stack(images), *NORM), torch.tensor(labels)


class LookupModel(nn.Module):
    """Logits from a table we control: each input is matched to the nearest known image, and that sample's row of
    `logits` is returned. Optionally also returns a second output, like a `WeakHeadModel`."""

    def __init__(self, images: torch.Tensor, logits: torch.Tensor, two_outputs: bool = False):
        super().__init__()
        self.register_buffer("images", images.flatten(1))
        self.register_buffer("logits", logits)
        self.two_outputs = two_outputs

    def forward(self, x):
        nearest = torch.cdist(x.flatten(1), self.images).argmin(dim=1)
        out = self.logits[nearest]
        return (out, torch.zeros_like(out)) if self.two_outputs else out


def _save_checkpoint(path, state, config=None):
    torch.save({"model": state, "epoch": 0, "step": 3, "config": json.dumps(config or {})}, path)
    return path


@pytest.fixture(scope="module")
def inputs(small_shards):
    return _eval_inputs(small_shards)


def test_oracle_model_scores_perfectly(small_shards, inputs):
    images, labels = inputs
    oracle = LookupModel(images, 30.0 * nn.functional.one_hot(labels, NUM_CLASSES).float())
    metrics, reliability = evaluate(oracle, small_shards, RECIPE, batch_size=5, normalization=NORM)
    assert metrics["n"] == 24 and metrics["skipped"] == 0
    assert metrics["top1"] == 1.0 and metrics["top5"] == 1.0
    assert metrics["ece"] < 1e-6 and metrics["aurc"] == 0.0 and metrics["nll"] < 1e-6
    assert int(reliability.count.sum()) == 24 and int(reliability.count[-1]) == 24


def test_metrics_equal_the_metric_functions_on_the_same_logits(small_shards, inputs):
    images, labels = inputs
    logits = torch.randn(len(labels), NUM_CLASSES, generator=torch.Generator().manual_seed(0)) * 3
    expected = ClassificationMetrics()
    expected.update(logits, labels)
    want = expected.compute()
    # a two-output model (like USKD's WeakHeadModel) is scored on its first output
    model = LookupModel(images, logits, two_outputs=True)
    got, reliability = evaluate(model, small_shards, "small", batch_size=7, model_name="smallcnn")
    for key in ("top1", "top5", "nll", "ece", "aurc", "eaurc", "n"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert 0.0 < got["top1"] < 1.0  # random logits: the check above is not trivially 0 or 1
    assert reliability.count.tolist() == expected.reliability().count.tolist()
    table = paper_units(got)
    assert table["top1_percent"] == pytest.approx(100 * want["top1"])
    assert table["aurc_x1000"] == pytest.approx(1000 * want["aurc"])


def test_shard_selection_and_training_mode_restored(small_shards, inputs):
    images, labels = inputs
    model = LookupModel(images, nn.functional.one_hot(labels, NUM_CLASSES).float()).train()
    metrics, _ = evaluate(model, small_shards, RECIPE, shards=[1], normalization=NORM)
    assert metrics["n"] == 12 and metrics["skipped"] == 0
    assert model.training


def test_smallcnn_checkpoint_cli_json_matches_library(small_shards, tmp_path):
    torch.manual_seed(0)
    model = build_model("smallcnn", NUM_CLASSES)
    ckpt = _save_checkpoint(tmp_path / "last.pt", model.state_dict(), {"student": "smallcnn", "image_size": 28})
    result = CliRunner().invoke(main, ["eval", "--model", "smallcnn", "--checkpoint", str(ckpt), "--data",
                                       str(small_shards), "--recipe", "small", "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout is exactly one JSON document
    m = out["metrics"]
    assert m["n"] == 24 and m["skipped"] == 0
    assert 0 <= m["top1"] <= m["top5"] <= 1 and m["nll"] > 0 and 0 <= m["ece"] <= 1 and 0 <= m["aurc"] <= 1
    assert out["paper_units"]["top1_percent"] == pytest.approx(100 * m["top1"])
    assert len(out["reliability"]["count"]) == 15 and sum(out["reliability"]["count"]) == 24
    direct, _ = evaluate(load_model_for_eval("smallcnn", ckpt, NUM_CLASSES, 28), small_shards, RECIPE,
                         model_name="smallcnn")
    for key in ("top1", "top5", "nll", "ece", "aurc"):
        assert m[key] == pytest.approx(direct[key], rel=1e-6), key

    # --model may be left out when the checkpoint records its student; the text output states the units
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--data", str(small_shards), "--recipe",
                                       "small"])
    assert result.exit_code == 0, result.output
    for text in ("top-1", "top-5", "NLL", "ECE", "AURC", "x 1000", "%", "24 image(s)"):
        assert text in result.stdout


def test_uskd_checkpoint_loads_into_the_plain_model(small_shards, tmp_path):
    torch.manual_seed(1)
    weak = attach_weak_head(build_model("smallcnn", NUM_CLASSES), "smallcnn", NUM_CLASSES).eval()
    assert any(k.startswith("weak_head.") for k in weak.state_dict())
    ckpt = _save_checkpoint(tmp_path / "uskd.pt", weak.state_dict())
    plain = load_model_for_eval("smallcnn", ckpt, NUM_CLASSES, 28)
    assert not any(k.startswith(("backbone.", "weak_head.")) for k in plain.state_dict())
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), weak(x)[0])
    via_plain, _ = evaluate(plain, small_shards, RECIPE, model_name="smallcnn")
    via_weak, _ = evaluate(weak, small_shards, RECIPE, model_name="smallcnn")
    assert via_plain["nll"] == pytest.approx(via_weak["nll"], rel=1e-6)


def test_checkpoint_needing_pickle_is_refused(small_shards, tmp_path):
    ckpt = tmp_path / "unsafe.pt"
    torch.save({"model": build_model("smallcnn", NUM_CLASSES).state_dict(), "made": datetime.date(2024, 1, 1)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        load_model_for_eval("smallcnn", ckpt, NUM_CLASSES, 28)
    result = CliRunner().invoke(main, ["eval", "--model", "smallcnn", "--checkpoint", str(ckpt), "--data",
                                       str(small_shards), "--json"])
    assert result.exit_code != 0
    assert "UnsafeCheckpointError" in result.output and "pickle" in result.output
    assert result.stdout.strip() == ""  # nothing on stdout that a --json consumer would try to parse


def test_wrong_architecture_is_refused_naming_keys(small_shards, tmp_path):
    ckpt = _save_checkpoint(tmp_path / "wide.pt", build_model("smallcnn_wide", NUM_CLASSES).state_dict())
    result = CliRunner().invoke(main, ["eval", "--model", "smallcnn", "--checkpoint", str(ckpt), "--data",
                                       str(small_shards), "--recipe", "small"])
    assert result.exit_code != 0 and "WeightsError" in result.output and "keys" in result.output


def _corrupt_one_image(src, dst) -> None:
    """Overwrite the PNG signature of the 4th sample of shard 0 in place (same size and keys)."""
    shutil.copytree(src, dst)
    shard = dst / load_manifest(dst).shards[0].name
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][3]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"NOTAPNG!")


def test_skip_bad_counts_the_skipped_sample(small_shards, tmp_path, inputs):
    bad = tmp_path / "bad"
    _corrupt_one_image(small_shards, bad)
    images, labels = inputs
    model = LookupModel(images, 30.0 * nn.functional.one_hot(labels, NUM_CLASSES).float())
    with pytest.raises(BadSampleError, match="small00003"):
        evaluate(model, bad, RECIPE, normalization=NORM)
    metrics, _ = evaluate(model, bad, RECIPE, normalization=NORM, skip_bad=True)
    assert metrics["n"] == 23 and metrics["skipped"] == 1 and metrics["top1"] == 1.0


def _ddp_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model("smallcnn", NUM_CLASSES)
        metrics, reliability = evaluate(model, data, RECIPE, batch_size=5, model_name="smallcnn")
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"metrics": metrics, "count": reliability.count.tolist()}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_count_every_sample_once(small_shards, tmp_path):
    out = str(tmp_path / "ddp.json")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(small_shards), out), nprocs=2)
    torch.manual_seed(0)
    single, _ = evaluate(build_model("smallcnn", NUM_CLASSES), small_shards, RECIPE, model_name="smallcnn")
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            got = json.load(f)
        assert got["metrics"]["n"] == 24 and got["metrics"]["skipped"] == 0 and sum(got["count"]) == 24
        for key in ("top1", "top5", "nll", "ece", "aurc"):
            assert math.isclose(got["metrics"][key], single[key], rel_tol=1e-6, abs_tol=1e-9), key


def test_eval_of_a_cache_trained_run_matches_its_val_log(small_shards, tmp_path):
    """End to end with the real loop: the checkpoint records no recipe (the cache's is in RUN/config.json), and
    `logitcache eval` with no --model/--recipe reproduces the run's own validation figures."""
    from logitcache.dump import DumpConfig, dump
    from logitcache.eval.evaluate import recorded_settings
    from logitcache.train.config import TrainConfig
    from logitcache.train.loop import train

    cache, run = tmp_path / "cache", tmp_path / "run"
    dump(DumpConfig(data=str(small_shards), out=str(cache), teacher="smallcnn", recipe="small", image_size=28,
                    epochs=1, topk=3, progress=False))
    last = train(TrainConfig(data=str(small_shards), out=str(run), student="smallcnn", loss="nkd", cache=str(cache),
                             val=str(small_shards), epochs=1, batch_size=8, progress=False))
    ckpt = run / "checkpoints" / "last.pt"
    recorded = recorded_settings(ckpt, load_checkpoint(ckpt))
    assert recorded["student"] == "smallcnn" and recorded["recipe"]["name"] == "small"
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--data", str(small_shards), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["recipe"] == recorded["recipe"]
    for key in ("top1", "top5", "nll", "ece", "aurc", "n"):
        assert got["metrics"][key] == pytest.approx(last["val"][key], rel=1e-6), key
