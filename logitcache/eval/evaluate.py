"""Evaluate a classifier on a dataset: top-1/top-5, NLL, ECE (15 bins) and AURC, as in the PS-KD paper's tables.

    model = load_model_for_eval("resnet18", "run/checkpoints/last.pt", num_classes=1000, image_size=224)
    metrics, reliability = evaluate(model, "val/", get_recipe("imagenet", 224), model_name="resnet18")

Each sample is shown once, through the recipe's deterministic evaluation view (`views.eval_view`: resize +
center crop for ``imagenet``, resize for ``small``), normalised with the model's own mean/std, and the first
output of the model is scored (a `WeakHeadModel` returns ``(logits, weak_logits)``; the weak head is not scored).

Under DDP (an initialised process group, e.g. ``torchrun``) each rank reads its share of the shards
(`shards.split_shards`) and `ClassificationMetrics.gather` merges the per-sample state, so every sample counts
exactly once and every rank returns the same figures. Batches never span two shards (`EvalBatches`) and each
rank's per-sample figures are reduced in sample order, so the figures do not depend on the worker count.
Results are fractions / nats (``metrics.py``); the paper's
tables print top-1/top-5/ECE x 100 and AURC x 1000 (`paper_units`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from logitcache.data.manifest import load_manifest
from logitcache.data.shards import ShardDataset
from logitcache.errors import LogitcacheError, ModelError, RunError
from logitcache.eval.metrics import ClassificationMetrics, ReliabilityBins
from logitcache.models.weights import extract_state_dict, load_checkpoint, load_state_dict_strict
from logitcache.models.zoo import build_model, model_normalization, model_spec
from logitcache.runtime import precision
from logitcache.runtime.bounded import MAX_RUN_JSON_BYTES, check_length, read_url_bounded
from logitcache.runtime.dist import PREFETCH_BATCHES, current_env, init_distributed
from logitcache.views.ops.geometry import normalize
from logitcache.views.recipe import Recipe, eval_view, get_recipe, resolve_recipe

__all__ = ["EvalBatches", "EvalTransform", "checkpoint_config", "evaluate", "load_model_for_eval", "paper_units",
           "recorded_settings", "resolve_eval_recipe"]


@dataclass(frozen=True)
class EvalTransform:
    """Sample -> (uint8 eval view (3, S, S), label). A picklable class so DataLoader workers can run it."""

    recipe: Recipe

    def __call__(self, sample) -> tuple[torch.Tensor, int]:
        return eval_view(sample.image, self.recipe), sample.label


class EvalBatches(torch.utils.data.IterableDataset):
    """``(images, labels, global indices)`` batches of the eval views of ``dataset``'s samples (a `ShardDataset`),
    at most ``batch_size`` each and never spanning two shards: a batch's samples — and so the model's float results
    on them — are a function of (shard, batch size), whatever the DataLoader's worker count (use it with
    ``batch_size=None``)."""

    def __init__(self, dataset: ShardDataset, recipe: Recipe, batch_size: int):
        super().__init__()
        self.dataset, self.transform, self.batch_size = dataset, EvalTransform(recipe), batch_size

    def __iter__(self):
        batch, shard = [], None
        for sample in self.dataset:
            if batch and (len(batch) == self.batch_size or sample.shard != shard):
                yield self._collate(batch)
                batch = []
            shard = sample.shard
            batch.append((*self.transform(sample), sample.index))
        if batch:
            yield self._collate(batch)

    @staticmethod
    def _collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, indices = zip(*batch, strict=True)
        return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def _resolve_normalization(normalization, model_name: str | None):
    if normalization is not None:
        if isinstance(normalization, str):
            normalization, model_name = None, normalization
        else:
            mean, std = normalization
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if model_name is None:
        raise ValueError("evaluate needs the model's normalisation: pass normalization=(mean, std) or model_name=")

    return model_normalization(model_name)


def evaluate(
    model: nn.Module,
    data,
    recipe: Recipe | str,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    shards: Sequence[int] | None = None,
    skip_bad: bool = False,
    normalization: tuple[Sequence[float], Sequence[float]] | str | None = None,
    model_name: str | None = None,
    image_size: int | None = None,
    n_bins: int = 15,
    progress: bool = False,
) -> tuple[dict[str, Any], ReliabilityBins]:
    """Score `model` on every sample of `data` (a manifest path/URL or `Manifest`), in the recipe's eval view.

    ``recipe``: a `Recipe`, or a recipe name (then ``image_size`` or the recipe's default size).
    ``normalization``: ``(mean, std)`` per channel on [0, 1] pixels, or a model name; default: ``model_name``'s
    (`models.model_normalization`). ``shards``: indices to use (default all). ``skip_bad``: leave out samples
    whose bytes cannot be decoded and count them (their indices stay taken).

    Returns ``(metrics, reliability)``: ``metrics`` = `ClassificationMetrics.compute` (top1, top5, nll, ece,
    aurc, eaurc, n) plus ``skipped`` (samples in the selected shards that were not scored), ``seconds`` and
    ``images_per_s``; ``reliability`` = the 15-bin `ReliabilityBins` over all ranks. The model is put in eval
    mode and its previous mode is restored afterwards (the train loop calls this every epoch).
    """

    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    manifest = load_manifest(data)
    if isinstance(recipe, str):
        recipe = get_recipe(recipe, image_size)
    mean, std = _resolve_normalization(normalization, model_name)
    device = torch.device(device)
    env = current_env(str(device))  # never creates a group: per-rank figures must be merged by one
    rank, world = env.rank, env.world
    dataset = ShardDataset(manifest, shards, rank=rank, world_size=world, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(EvalBatches(dataset, recipe, batch_size), batch_size=None,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False,
                                         prefetch_factor=PREFETCH_BATCHES if workers else None)
    selected = dataset.shards
    total = sum(manifest.shards[s].num_samples for s in selected)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    was_training = model.training
    model.eval()
    metrics, indices = ClassificationMetrics(n_bins=n_bins, topk=5), []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for images, labels, index in loader:
                indices.append(index)
                x = normalize(images.to(device, non_blocking=True), mean_t, std_t)
                with precision.eval_autocast(device):  # float32 (no autocast, no TF32): metrics from fp32 logits
                    out = model(precision.prepare_input(x, device))
                if isinstance(out, (tuple, list)):  # WeakHeadModel: (logits, weak_logits); score the logits
                    out = out[0]
                metrics.update(out.float(), labels.to(device))
                if bar is not None:
                    bar.update(len(labels) * world)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    # in sample order, so the float sums do not depend on which worker read which shard first
    merged = metrics.sorted_by(torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)).gather()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = dict(merged.compute())
    result["skipped"] = total - int(result["n"])
    result["seconds"] = seconds
    result["images_per_s"] = result["n"] / seconds if seconds > 0 else float("nan")
    return result, merged.reliability()


def paper_units(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures as the PS-KD paper's tables print them: top-1/top-5/ECE in %, AURC and E-AURC x 1000, NLL in
    nats."""
    out = {
        "top1_percent": 100.0 * metrics["top1"],
        "top5_percent": 100.0 * metrics["top5"],
        "nll": metrics["nll"],
        "ece_percent": 100.0 * metrics["ece"],
        "aurc_x1000": 1000.0 * metrics["aurc"],
    }
    if "eaurc" in metrics:
        out["eaurc_x1000"] = 1000.0 * metrics["eaurc"]
    return out


def checkpoint_config(obj: Any, where: str = "the checkpoint") -> dict[str, Any]:
    """The training config stored in one of our checkpoints (a JSON string under ``config``), else ``{}``; one
    over `MAX_RUN_JSON_BYTES` is refused naming ``where`` (never parsed)."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), str):
        check_length(len(obj["config"]), MAX_RUN_JSON_BYTES, name=f"{where}'s config", what="stored config",
                     error=LogitcacheError)
        try:
            config = json.loads(obj["config"])
        except json.JSONDecodeError:
            return {}
        return config if isinstance(config, dict) else {}
    return {}


def recorded_settings(checkpoint: str | os.PathLike, obj: Any) -> dict[str, Any]:
    """What a training run recorded about the model a checkpoint holds: ``{"student", "recipe", "image_size"}``
    (each may be None). ``recipe`` is the resolved recipe JSON (`Recipe.to_json`) from ``RUN/config.json`` when
    the checkpoint lies in ``RUN/checkpoints/`` (a cache-trained run records the cache's recipe only there),
    else the recipe name the checkpoint's config holds."""
    config = checkpoint_config(obj, os.fspath(checkpoint))
    out = {"student": config.get("student"), "recipe": config.get("recipe"), "image_size": config.get("image_size")}
    path = os.fspath(checkpoint)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if "://" not in path else None
    if run_dir and os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints":
        try:  # capped: an over-large one is a RunError naming it
            run_config = json.loads(read_url_bounded(os.path.join(run_dir, "config.json"), MAX_RUN_JSON_BYTES,
                                                     what="run file", error=RunError))
        except (OSError, ValueError):
            run_config = {}
        resolved = run_config.get("resolved") if isinstance(run_config, dict) else None
        if isinstance(resolved, dict) and isinstance(resolved.get("recipe"), dict):
            if out["student"] in (None, run_config.get("student")):  # the config.json of this very run
                out["student"] = run_config.get("student")
                out["recipe"] = resolved["recipe"]
    return out


def resolve_eval_recipe(model_name: str, recorded: dict[str, Any], recipe: str | None = None,
                        image_size: int | None = None, default: dict[str, Any] | None = None) -> Recipe:
    """The eval recipe, by the one rule every command follows (`views.recipe.resolve_recipe`): ``recipe`` /
    ``image_size`` when given (evaluating at another size is legitimate); else what the checkpoint's run
    recorded; else the data's ``default_recipe``; else a clear error (no guess from the model)."""
    import dataclasses

    rec = recorded.get("recipe")
    if recipe is None and isinstance(rec, dict):
        found = Recipe.from_json(rec)
        return dataclasses.replace(found, image_size=image_size) if image_size else found
    if recipe is None and isinstance(rec, str):
        recipe = rec
    size = image_size or recorded.get("image_size") or (model_spec(model_name).input_size if recipe else None)
    return resolve_recipe(recipe, size, default=default,
                          default_where=f"the data's manifest (and the checkpoint of {model_name} records none)")


def load_model_for_eval(
    model_name: str,
    checkpoint: str | os.PathLike,
    num_classes: int,
    image_size: int | None = None,
    *,
    checkpoint_obj: Any = None,
) -> nn.Module:
    """Build `model_name` and load `checkpoint` into it strictly, in eval mode on the CPU.

    ``checkpoint``: one of our training checkpoints (``{"model": state_dict, ...}``), a ``state_dict`` file, or a
    dict holding one under ``state_dict``; ``module.`` / ``_orig_mod.`` prefixes are removed. A USKD checkpoint
    (``backbone.*`` / ``weak_head.*``) loads into the plain model; the weak head is dropped. Read with
    ``weights_only=True`` (`models.load_checkpoint`): a file that needs pickle raises `UnsafeCheckpointError`.
    ``checkpoint_obj``: the already loaded checkpoint, to avoid reading the file twice.
    """

    source = os.fspath(checkpoint)
    obj = load_checkpoint(source) if checkpoint_obj is None else checkpoint_obj
    state = extract_state_dict(obj, source=source)
    model = build_model(model_name, num_classes, image_size=image_size)
    load_state_dict_strict(model, state, source=source)
    return model.eval()


def evaluate_checkpoint(checkpoint: str | os.PathLike, data, *, model_name: str | None = None,
                        recipe: str | None = None, image_size: int | None = None, batch_size: int = 256,
                        workers: int = 0, device: str = "cpu", shards: Sequence[int] | None = None,
                        skip_bad: bool = False, progress: bool = False) -> dict[str, Any] | None:
    """What ``logitcache eval`` does: load a checkpoint (weights-only), resolve its architecture and eval view
    (given, else what its run recorded, else the model's defaults), score it on ``data``.

    Under torchrun the ranks split the shards (`runtime.dist`: each rank on ``cuda:LOCAL_RANK`` for ``cuda``);
    rank 0 gets ``{"model", "recipe", "manifest", "metrics", "reliability"}``, other ranks None."""
    env = init_distributed(device)
    manifest = load_manifest(data)
    obj = load_checkpoint(checkpoint)
    recorded = recorded_settings(checkpoint, obj)
    if model_name is not None and recorded["student"] not in (None, model_name):
        recorded = {"student": None, "recipe": None, "image_size": None}  # another model: its settings do not apply
    model_name = model_name or recorded["student"]
    if not model_name:
        raise ModelError(f"{checkpoint} does not record its architecture; pass --model NAME")
    view_recipe = resolve_eval_recipe(model_name, recorded, recipe, image_size, default=manifest.default_recipe)
    model = load_model_for_eval(model_name, checkpoint, manifest.num_classes, view_recipe.image_size,
                                checkpoint_obj=obj).to(env.device)
    metrics, reliability = evaluate(model, manifest, view_recipe, batch_size=batch_size, workers=workers,
                                    device=env.device, shards=shards, skip_bad=skip_bad, model_name=model_name,
                                    progress=progress)
    if not env.is_main:
        return None
    return {"model": model_name, "recipe": view_recipe, "manifest": manifest, "metrics": metrics,
            "reliability": reliability}
