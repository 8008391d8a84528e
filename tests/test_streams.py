"""The training data order is a function of (seed, epoch, rank count, streams), never of the DataLoader worker count:
a rank's shards are split over ``--streams`` S streams, each shuffled (or spread) and batched on its own, and the
batches leave round robin over the streams; worker w of W (W divides S) hosts streams w, w+W, ... ."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import make_png_gray
from click.testing import CliRunner

from logitcache.cli import main as cli
from logitcache.cli.options import resolve_workers
from logitcache.data.convert.fashion_mnist import FASHION_MNIST_CLASSES
from logitcache.data.manifest import load_manifest
from logitcache.data.shards import ShardDataset
from logitcache.data.split import split_shards
from logitcache.data.write import write_shards
from logitcache.dump import DumpConfig, dump
from logitcache.errors import LogitcacheError
from logitcache.eval.evaluate import EvalBatches, evaluate
from logitcache.models.weights import load_checkpoint
from logitcache.models.zoo import build_model
from logitcache.replay import DEFAULT_STREAMS, CachedViews, FreshViews, collate, round_robin, stream_batches
from logitcache.runtime import dist
from logitcache.train.checkpoint import config_diff
from logitcache.train.config import TrainConfig
from logitcache.train.loop import train
from logitcache.views.recipe import get_recipe

SEED = 3


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """44 grayscale 28 px samples in 6 shards: five of 8 and one of 4 (streams of unequal length)."""
    rng = np.random.default_rng(7)
    samples = ((f"u{i:04d}", {"png": make_png_gray(rng), "cls": str(i % 10).encode()}) for i in range(44))
    out = tmp_path_factory.mktemp("uneven_shards")
    write_shards(samples, out, class_names=FASHION_MNIST_CLASSES, samples_per_shard=8)
    return out


@pytest.fixture(scope="module")
def uneven_cache(uneven_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven_cache") / "cache.zarr"
    dump(DumpConfig(data=str(uneven_shards), out=str(out), teacher="smallcnn", recipe="small", epochs=2, topk=10,
                    seed=SEED, batch_size=8, progress=False))
    return out


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), student="smallcnn", loss="ce", recipe="small", epochs=2, batch_size=5,
                lr=0.05, seed=SEED, progress=False)
    return TrainConfig(**{**base, **kw})


def timeless(d: dict | None) -> dict | None:
    return None if d is None else {k: v for k, v in d.items() if k not in ("seconds", "images_per_s")}


def figures(run) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{"train": timeless(m["train"]), "val": timeless(m["val"]), "step": m["step"]} for m in lines]


def weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run) / "checkpoints" / "last.pt")["model"]


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("views_per_decode", [1, 2])
def test_the_training_curve_does_not_depend_on_the_worker_count(uneven_shards, uneven_cache, tmp_path,
                                                                 views_per_decode):
    """Teacher-free CE (fresh views) with N = 1, cached NKD with N = 2: --workers 0, 1, 2, 4 train the same steps
    on the same batches, so the curves (validation too) and the final weights are equal bit for bit."""
    kw = dict(views_per_decode=views_per_decode, val=str(uneven_shards))
    if views_per_decode > 1:
        kw.update(loss="nkd", cache=str(uneven_cache), recipe=None, batch_size=4)  # every stream holds a batch
    runs = {}
    for workers in (0, 1, 2, 4):
        train(cfg(uneven_shards, tmp_path / f"w{workers}", workers=workers, **kw))
        runs[workers] = (figures(tmp_path / f"w{workers}"), weights(tmp_path / f"w{workers}"))
    curve, final = runs[0]
    assert sum(f["train"]["samples"] for f in curve) == 44 * 2  # every view of both epochs trained
    assert all(f["val"]["n"] == 44 for f in curve)
    for workers, (c, w) in runs.items():
        assert c == curve, f"--workers {workers} trained another curve than --workers 0"
        assert same_weights(w, final), f"--workers {workers} ended with other weights than --workers 0"


def test_resume_mid_pass_with_other_workers_gives_the_uninterrupted_curve(uneven_shards, uneven_cache, tmp_path):
    """--views-per-decode 2: stopped after the pass's first logged epoch with 2 workers, resumed inside the pass
    (re-reading its trained batches to skip them) with 0 and then 4 workers; the uninterrupted run used 1."""
    common = dict(loss="nkd", cache=str(uneven_cache), recipe=None, batch_size=4, views_per_decode=2, epochs=4,
                  warmup_epochs=1)
    train(cfg(uneven_shards, tmp_path / "full", workers=1, **common))
    train(cfg(uneven_shards, tmp_path / "part", workers=2, **common), stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["epoch_complete"]) == (0, True) and ckpt["batches_done"] > 0  # inside pass 0
    train(cfg(uneven_shards, tmp_path / "part", workers=0, resume=True, **common), stop_after_epochs=2)
    train(cfg(uneven_shards, tmp_path / "part", workers=4, resume=True, **common))
    assert figures(tmp_path / "part") == figures(tmp_path / "full")
    assert same_weights(weights(tmp_path / "part"), weights(tmp_path / "full"))


def test_a_resume_keeps_the_streams_and_old_runs_read_one_stream_per_worker(uneven_shards, tmp_path):
    train(cfg(uneven_shards, tmp_path / "run", epochs=2), stop_after_epochs=1)
    with pytest.raises(LogitcacheError, match="streams: checkpoint has 8, now 4"):
        train(cfg(uneven_shards, tmp_path / "run", epochs=2, streams=4, resume=True))
    # a checkpoint from before --streams (no "streams" in its config) read one stream per DataLoader worker
    old = {k: v for k, v in cfg(uneven_shards, "r", workers=2, streams=2).to_json().items() if k != "streams"}
    assert config_diff(old, cfg(uneven_shards, "r", workers=2, streams=2)) == []
    assert config_diff(old, cfg(uneven_shards, "r", workers=2)) == ["streams: checkpoint has 2, now 8"]
    assert config_diff({**old, "workers": 0}, cfg(uneven_shards, "r", streams=1)) == []


def uneven_views(data, streams, batch_size=3, **kw):
    return FreshViews(data, seed=SEED, epoch=2, recipe="small", shuffle_seed=SEED, return_items=True,
                      batch_size=batch_size, streams=streams, **kw)


def batch_keys(batches) -> list[tuple]:
    return [tuple((int(i), int(e)) for i, e in zip(b.index, b.epoch, strict=True)) for b in batches]


@pytest.mark.parametrize(("streams", "views_per_decode"), [(8, 1), (4, 2), (3, 1)])
def test_every_worker_count_dividing_the_streams_gives_their_round_robin(uneven_shards, streams, views_per_decode):
    """PyTorch's in-order DataLoader over workers that host whole streams yields the round robin over the streams
    (streams of 8, 8, 8, 8, 8, 4 samples and empty ones: they run out at different rounds), pixels included."""
    views = uneven_views(uneven_shards, streams, views_per_decode=views_per_decode)
    # the definition: stream s reads split_shards(order, rank, world, s, S), batched alone; one batch per stream
    # per round, in stream order, skipping streams that ran out
    per_stream = [list(views._stream_batches(s)) for s in range(streams)]
    want = [b[r] for r in range(max(len(b) for b in per_stream)) for b in per_stream if r < len(b)]
    order = views.split.shard_order()
    assert [sum(len(b.index) for b in bs) for bs in per_stream] == [
        views_per_decode * sum(load_manifest(uneven_shards).shards[i].num_samples
                               for i in split_shards(order, 0, 1, s, streams)) for s in range(streams)]
    assert len(want) == views.num_batches() == views.num_batches(7, num_workers=2)
    for workers in [w for w in (0, 1, 2, 3, 4, 8) if w <= 1 or streams % w == 0]:
        got = list(stream_batches(views, num_workers=workers))
        assert batch_keys(got) == batch_keys(want), f"{workers} workers"
        assert all(torch.equal(g.image, w.image) for g, w in zip(got, want, strict=True))


def test_streams_equal_to_the_workers_are_the_per_worker_order_of_before(uneven_shards):
    """A DataLoader over a dataset without streams (each of its W workers one stream, batched by the DataLoader)
    gives the batches of W streams: a run from before --streams resumes with --streams W."""
    for workers in (0, 2, 4):
        legacy = torch.utils.data.DataLoader(uneven_views(uneven_shards, None), batch_size=3, num_workers=workers,
                                             collate_fn=collate)
        assert batch_keys(legacy) == batch_keys(stream_batches(uneven_views(uneven_shards, max(workers, 1))))


def test_round_robin_keeps_the_slots_of_exhausted_streams_only_when_asked():
    streams = [[1, 2], [], [3, 4, 5], [6]]
    assert list(round_robin([iter(s) for s in streams], keep_slots=False)) == [1, 3, 6, 2, 4, 5]
    assert list(round_robin([iter(s) for s in streams], keep_slots=True)) == [1, None, 3, 6, 2, None, 4, None,
                                                                             None, None, 5]


def test_worker_counts_that_do_not_divide_the_streams_are_refused(uneven_shards, monkeypatch):
    with pytest.raises(ValueError, match=r"3 DataLoader workers cannot share 8 streams.*one of \[1, 2, 4, 8\]"):
        cfg(uneven_shards, "r", workers=3)
    with pytest.raises(ValueError, match="3 DataLoader workers cannot share 8 streams"):
        stream_batches(uneven_views(uneven_shards, 8), num_workers=3)
    with pytest.raises(ValueError, match="streams=2: give streams >= 1 and the batch_size"):
        FreshViews(uneven_shards, seed=SEED, epoch=0, recipe="small", streams=2)
    assert cfg(uneven_shards, "r", workers=6, streams=12).streams == 12
    # the --workers default (min(8, cores - 1) here) is rounded down to a divisor of --streams
    monkeypatch.setattr(dist, "default_workers", lambda: 7)
    assert [resolve_workers(None, s) for s in (8, 6, 5, 1)] == [4, 6, 5, 1]
    assert resolve_workers(None) == 7 and resolve_workers(3, 8) == 3  # given: as given (TrainConfig checks it)


def test_the_cli_documents_streams_and_refuses_workers_that_do_not_divide_them(uneven_shards, tmp_path):
    runner = CliRunner()
    assert f"[default: {DEFAULT_STREAMS}]" in " ".join(runner.invoke(cli, ["train", "--help"]).output.split())
    out = runner.invoke(cli, ["train", "--data", str(uneven_shards), "--out", str(tmp_path / "r"), "--student",
                              "smallcnn", "--loss", "ce", "--recipe", "small", "--workers", "3"])
    assert out.exit_code != 0 and "3 DataLoader workers cannot share 8 streams" in out.output
    assert "Traceback" not in out.output


def test_the_readme_streams_loop_yields_public_batches_whatever_the_workers(uneven_shards, uneven_cache):
    """README "Your own training loop": CachedViews(..., batch_size, streams) + stream_batches give (images,
    TopKLogits, target) batches, the same for 0 and 2 workers, every sample once."""
    runs = []
    for workers in (0, 2):
        views = CachedViews(uneven_shards, uneven_cache, epoch=1, shuffle_seed=0, batch_size=16, streams=4,
                            return_index=True)
        runs.append(list(stream_batches(views, num_workers=workers)))
    for (a_img, a_row, a_t, a_i), (b_img, b_row, b_t, b_i) in zip(*runs, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_row.logits, b_row.logits) and torch.equal(a_i, b_i)
        assert torch.equal(a_t, b_t)
        assert a_img.dtype == torch.uint8 and len(a_row.logits) == len(a_t) == len(a_i) <= 16
    assert sorted(int(i) for b in runs[0] for i in b[3]) == list(range(44))


def test_evaluation_batches_never_span_shards_and_its_figures_do_not_depend_on_the_workers(uneven_shards):
    """Validation/eval: a batch is a function of (shard, batch size) and the per-sample figures are reduced in
    sample order, so every worker count gives the same figures bit for bit."""
    model = build_model("smallcnn", 10, image_size=28)
    recipe = get_recipe("small", 28)
    batches = list(EvalBatches(ShardDataset(load_manifest(uneven_shards)), recipe, 3))
    assert [len(b[2]) for b in batches] == [3, 3, 2] * 5 + [3, 1]  # five shards of 8, one of 4
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(44))
    runs = [evaluate(model, uneven_shards, recipe, batch_size=3, workers=w, model_name="smallcnn")
            for w in (0, 2, 4)]
    assert timeless(runs[0][0]) == timeless(runs[1][0]) == timeless(runs[2][0]) and runs[0][0]["n"] == 44
    assert json.dumps(runs[0][1].to_dict()) == json.dumps(runs[2][1].to_dict())  # (NaN in empty bins)
