"""`logitcache.plots` and `logitcache plot`: PNGs from a run directory in the train loop's format."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.errors import RunError
from logitcache.eval.metrics import reliability_bins
from logitcache.eval.plots import compare_runs, plot_run, read_metrics, read_reliability

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run, *, epochs=4, top1_start=0.5, with_val=True, duplicate_epoch=None):
    """A synthetic run directory in the format `logitcache train` writes (api notes: metrics.jsonl + reliability)."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"student": "smallcnn", "loss": "nkd"}))
    lines = []
    for e in range(epochs):
        record = {
            "epoch": e, "step": 10 * (e + 1), "lr": 0.1 / (e + 1),
            "train": {"loss": 2.0 / (e + 1), "ce": 1.2 / (e + 1), "nkd": 0.8 / (e + 1), "top1": 0.4 + 0.1 * e,
                      "images_per_s": 5000.0, "seconds": 1.5},
            "val": ({"top1": top1_start + 0.05 * e, "top5": 0.9, "nll": 1.0 / (e + 1), "ece": 0.05 / (e + 1),
                     "aurc": 0.1, "n": 100} if with_val else None),
            "cache_epoch": e % 2,
        }
        lines.append(json.dumps(record))
        if e == duplicate_epoch:  # a resumed run logs the epoch again; the later record must win
            record = dict(record, val={**record["val"], "top1": 0.99})
            lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_val:
        g = torch.Generator().manual_seed(0)
        logits, target = torch.randn(200, 10, generator=g) * 3, torch.randint(0, 10, (200,), generator=g)
        (run / "val_reliability.json").write_text(json.dumps(reliability_bins(logits, target).to_dict()))
    return run


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        data = f.read()
    return data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_plot_run_writes_curves_and_reliability(tmp_path):
    run = _write_run(tmp_path / "nkd", duplicate_epoch=1)
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and records[1]["val"]["top1"] == 0.99
    assert sum(read_reliability(run)["count"]) == 200
    written = plot_run(run)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["curves.png", "reliability.png"]
    assert all(p.startswith(str(run / "plots")) and _is_png(p) for p in written)


def test_run_without_val_draws_curves_only(tmp_path):
    run = _write_run(tmp_path / "noval", with_val=False)
    written = plot_run(run, tmp_path / "figs")
    assert len(written) == 1 and _is_png(written[0])


def test_compare_runs(tmp_path):
    runs = [_write_run(tmp_path / name, top1_start=s) for name, s in (("ce", 0.5), ("nkd", 0.6), ("uskd", 0.55))]
    out = compare_runs(runs, tmp_path / "cmp" / "top1.png", labels=["CE", "NKD", "USKD"])
    assert _is_png(out)
    with pytest.raises(ValueError, match="labels"):
        compare_runs(runs, tmp_path / "x.png", labels=["one"])


def test_cli_plot_prints_where_it_wrote(tmp_path):
    run = _write_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["plot", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    paths = [line.removeprefix("wrote ") for line in result.stdout.splitlines()]
    assert len(paths) == 2 and all(_is_png(p) for p in paths)

    other = _write_run(tmp_path / "other", top1_start=0.7)
    result = CliRunner().invoke(main, ["plot", str(run), str(other), "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "both" / "compare.png") in result.stdout and _is_png(tmp_path / "both" / "compare.png")


def test_missing_or_broken_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nothing")
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "RunError" in result.output
    run = _write_run(tmp_path / "broken")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(RunError, match="metrics.jsonl:2"):
        read_metrics(run)
    # a partial last line (a run killed while appending) is ignored
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train": {"loss": 1.0}}\n{"epoch": 1, "tra')
    assert [r["epoch"] for r in read_metrics(run)] == [0]
