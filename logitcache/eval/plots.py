"""PNG figures of a run directory: training curves, the reliability diagram, and several runs compared.

    plot_run("runs/nkd")                 # -> runs/nkd/plots/curves.png, runs/nkd/plots/reliability.png
    compare_runs(["runs/ce", "runs/nkd"], "top1.png")

Inputs are the run-directory files that ``logitcache train`` writes: ``RUN/metrics.jsonl`` (one JSON object per
epoch: ``{"epoch", "train": {"loss", <term>..., "top1", ...}, "val": {"top1", "ece", ...}, ...}``) and
``RUN/val_reliability.json`` (`metrics.ReliabilityBins.to_dict`). Runs may be local paths or fsspec URLs.
A resumed run can log an epoch twice; the last record of each epoch wins. Matplotlib runs on its Agg backend
(no display needed). Accuracies and ECE are drawn in %, as the papers print them.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from logitcache.errors import RunError
from logitcache.runtime.bounded import MAX_METRICS_LOG_BYTES, MAX_RUN_JSON_BYTES, read_url_bounded

__all__ = ["compare_runs", "plot_reliability", "plot_run", "plot_training_curves", "read_metrics",
           "read_reliability"]

# keys of the "train" record that are bookkeeping, not loss terms
_NOT_LOSS_TERMS = {"loss", "top1", "top5", "images_per_s", "seconds", "lr", "n", "skipped", "steps", "samples",
                   "samples_skipped"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # never a GUI backend: plots are written from servers and tests
    import matplotlib.pyplot as plt

    return plt


def _join(base: str | os.PathLike, name: str) -> str:
    return os.fspath(base).rstrip("/") + "/" + name


def _read_text(url: str, max_bytes: int, what: str) -> str:
    """The file's text; one over ``max_bytes`` is a `RunError` naming it, raised before it is read."""
    return read_url_bounded(url, max_bytes, what=what, error=RunError).decode("utf-8")


def _save(fig, url: str) -> str:
    import fsspec

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return url


def read_metrics(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN/metrics.jsonl``, sorted by epoch; the last record of an epoch wins."""
    url = _join(run, "metrics.jsonl")
    try:
        text = _read_text(url, MAX_METRICS_LOG_BYTES, "metrics log")
    except FileNotFoundError as e:
        raise RunError(f"{url}: no metrics log here (is {os.fspath(run)} a run directory?)") from e
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(text.splitlines()):  # a run killed while appending leaves a partial last line
                break
            raise RunError(f"{url}:{number}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or "epoch" not in record:
            raise RunError(f"{url}:{number}: a metrics record must be a JSON object with an 'epoch'")
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_reliability(run: str | os.PathLike) -> dict[str, list] | None:
    """``RUN/val_reliability.json`` (edges, confidence, accuracy, count), or None when the run has none."""
    url = _join(run, "val_reliability.json")
    try:
        bins = json.loads(_read_text(url, MAX_RUN_JSON_BYTES, "reliability file"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise RunError(f"{url}: not JSON ({e.msg})") from e
    missing = [k for k in ("edges", "confidence", "accuracy", "count") if not isinstance(bins, dict) or k not in bins]
    if missing:
        raise RunError(f"{url}: reliability bins lack {missing}")
    return bins


def _value(record: dict[str, Any], section: str, key: str) -> float:
    part = record.get(section) or {}
    v = part.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def _series(records, section: str, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    epochs, values = [], []
    for r in records:
        v = _value(r, section, key)
        if not math.isnan(v):
            epochs.append(int(r["epoch"]) + 1)  # the x axis counts epochs from 1: "after epoch 1"
            values.append(scale * v)
    return epochs, values


def _loss_terms(records) -> list[str]:
    terms: list[str] = []
    for r in records:
        for k, v in (r.get("train") or {}).items():
            if k not in _NOT_LOSS_TERMS and k not in terms and isinstance(v, (int, float)):
                terms.append(k)
    return terms


def plot_training_curves(records: Sequence[dict[str, Any]], out_png: str | os.PathLike, *, title: str = "") -> str:
    """Three panels against epoch: the training loss and each of its terms; top-1 (val, and train when logged);
    val ECE. Returns the path written."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc, ax_ece) = plt.subplots(1, 3, figsize=(15, 4.2))

    x, y = _series(records, "train", "loss")
    ax_loss.plot(x, y, "o-", color="black", lw=2, label="loss (sum)")
    for term in _loss_terms(records):
        tx, ty = _series(records, "train", term)
        ax_loss.plot(tx, ty, ".--", label=term)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss and its terms")
    ax_loss.legend(fontsize=8)

    for section, style in (("val", "o-"), ("train", ".--")):
        tx, ty = _series(records, section, "top1", 100.0)
        if tx:
            ax_acc.plot(tx, ty, style, label=f"{section} top-1")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 accuracy")
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no accuracy logged", ha="center", va="center", transform=ax_acc.transAxes)

    tx, ty = _series(records, "val", "ece", 100.0)
    if tx:
        ax_ece.plot(tx, ty, "o-", color="tab:red", label="val ECE")
        ax_ece.legend(fontsize=8)
    else:
        ax_ece.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax_ece.transAxes)
    ax_ece.set(xlabel="epoch", ylabel="ECE (%, 15 bins)", title="expected calibration error (val)")

    for ax in (ax_loss, ax_acc, ax_ece):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, os.fspath(out_png))


def _reliability_ece(bins: dict[str, list]) -> float:
    n = sum(bins["count"])
    if n == 0:
        return math.nan
    return sum(c * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
               if c) / n


def plot_reliability(bins: dict[str, list], out_png: str | os.PathLike, *, title: str = "") -> str:
    """Reliability diagram: per-bin accuracy (bars) against confidence, the diagonal of perfect calibration, the
    gap to each bin's mean confidence, and the samples per bin below; ECE in the title. Returns the path."""
    plt = _pyplot()
    edges = [float(e) for e in bins["edges"]]
    counts = [int(c) for c in bins["count"]]
    accuracy = [float(a) if a is not None and c else math.nan for a, c in zip(bins["accuracy"], counts, strict=True)]
    confidence = [float(f) if f is not None and c else math.nan for f, c in zip(bins["confidence"], counts,
                                                                                   strict=True)]
    left = edges[:-1]
    width = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    ece = _reliability_ece({"count": counts, "accuracy": [0.0 if math.isnan(a) else a for a in accuracy],
                            "confidence": [0.0 if math.isnan(f) else f for f in confidence]})

    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.bar(left, [0 if math.isnan(a) else a for a in accuracy], width=width, align="edge", color="tab:blue",
           edgecolor="black", lw=0.6, label="accuracy")
    gap_bottom = [min(a, f) for a, f in zip(accuracy, confidence, strict=True)]
    gap_height = [abs(a - f) for a, f in zip(accuracy, confidence, strict=True)]
    keep = [i for i, c in enumerate(counts) if c]
    ax.bar([left[i] for i in keep], [gap_height[i] for i in keep], bottom=[gap_bottom[i] for i in keep],
           width=[width[i] for i in keep], align="edge", color="tab:red", alpha=0.35, edgecolor="tab:red",
           hatch="//", lw=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="accuracy")
    ax.legend(loc="upper left", fontsize=8)
    n = sum(counts)
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}reliability: ECE = {100 * ece:.2f}% ({len(counts)} bins, {n} samples)")
    ax.grid(alpha=0.3)

    # counts as numbers over the bars: a well-trained model puts most samples in the last bin, which would
    # flatten the others on a linear axis (and a log axis reads badly for counts of 0 and 1)
    bars = ax_count.bar(left, counts, width=width, align="edge", color="gray", edgecolor="black", lw=0.6)
    ax_count.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=6, padding=1,
                       rotation=90 if len(counts) > 20 else 0)
    ax_count.set(xlim=(0, 1), ylim=(0, 1.3 * max(counts + [1])), xlabel="confidence (max probability)",
                 ylabel="samples")
    ax_count.grid(alpha=0.3)
    return _save(fig, os.fspath(out_png))


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[str]:
    """Draw ``curves.png`` (from metrics.jsonl) and ``reliability.png`` (when val_reliability.json exists) into
    ``out`` (default ``RUN/plots``). Returns the paths written."""
    out = _join(run, "plots") if out is None else os.fspath(out)
    name = os.path.basename(os.fspath(run).rstrip("/"))
    records = read_metrics(run)
    written = [plot_training_curves(records, _join(out, "curves.png"), title=name)]
    bins = read_reliability(run)
    if bins is not None:
        last = f" (epoch {int(records[-1]['epoch']) + 1})" if records else ""
        written.append(plot_reliability(bins, _join(out, "reliability.png"), title=f"{name}, val{last}"))
    return written


def compare_runs(
    runs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    metric: str = "top1",
    title: str = "",
) -> str:
    """One figure with the val ``metric`` (top1, top5, ece: in %; nll, aurc as logged) of several runs against
    epoch. ``labels`` default to the run directories' names. Returns the path written."""
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    plt = _pyplot()
    percent = metric in ("top1", "top5", "ece")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        label = labels[i] if labels is not None else os.path.basename(os.fspath(run).rstrip("/"))
        x, y = _series(read_metrics(run), "val", metric, 100.0 if percent else 1.0)
        if x:
            ax.plot(x, y, "o-", ms=3, label=f"{label} (last {y[-1]:.2f})")
        else:
            ax.plot([], [], label=f"{label} (no val {metric})")
    names = {"top1": "top-1", "top5": "top-5", "ece": "ECE", "nll": "NLL", "aurc": "AURC"}
    ax.set(xlabel="epoch", ylabel=f"val {names.get(metric, metric)}{' (%)' if percent else ''}",
           title=title or f"val {names.get(metric, metric)} per epoch")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, os.fspath(out_png))
