"""`logitcache eval`: a checkpoint's top-1/top-5/NLL/ECE/AURC on a dataset."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    _print_json,
    data_option,
    device_option,
    json_option,
    reports_errors,
    resolve_workers,
    shards_option,
    workers_option,
)


# ---------------------------------------------------------------- eval (a model on a dataset)
def _json_safe(obj):
    """NaN/inf -> None (empty reliability bins are NaN), so --json output is strict JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@click.command("eval")
@click.option("--model", "model_name", default=None,
              help="architecture of the checkpoint (default: the student recorded in one of our checkpoints)")
@click.option("--checkpoint", required=True,
              help="our training checkpoint (RUN/checkpoints/last.pt) or a state_dict file; read weights-only")
@data_option()
@click.option("--recipe", default=None, help="view recipe whose eval view is used: imagenet | small | deit | tv-v2 "
              "(default: the checkpoint's run's, else the data's default_recipe)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the checkpoint's, "
              "else the model's own)")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@workers_option()
@device_option()
@shards_option()
@click.option("--skip-bad", is_flag=True, help="skip corrupt samples (counted and reported) instead of stopping")
@json_option()
@reports_errors
def eval_command(model_name, checkpoint, data, recipe, image_size, batch_size, workers, device, shard_selection,
                 skip_bad, as_json):
    """Evaluate a checkpoint on --data: top-1, top-5, NLL, ECE (15 bins), AURC, in the PS-KD paper's units
    (top-1/top-5/ECE in %, AURC x 1000, NLL in nats). Under `torchrun` ranks split the shards and every sample
    counts once."""
    from logitcache.data.split import parse_shard_selection
    from logitcache.eval.evaluate import evaluate_checkpoint, paper_units

    result = evaluate_checkpoint(
        checkpoint, data, model_name=model_name, recipe=recipe, image_size=image_size, batch_size=batch_size,
        workers=resolve_workers(workers), device=device,
        shards=shard_selection and parse_shard_selection(shard_selection),
        skip_bad=skip_bad, progress=not as_json)
    if result is None:  # not rank 0 of a torchrun job: rank 0 reports
        return
    model_name, view_recipe, manifest, metrics, reliability = (
        result["model"], result["recipe"], result["manifest"], result["metrics"], result["reliability"])
    table = paper_units(metrics)
    if as_json:
        _print_json(_json_safe({
            "model": model_name, "checkpoint": checkpoint, "data": data, "recipe": view_recipe.to_json(),
            "num_classes": manifest.num_classes, "metrics": metrics, "paper_units": table,
            "units": {"metrics": "fractions; nll in nats", "paper_units": "top-1/top-5/ECE in %, AURC x 1000"},
            "reliability": reliability.to_dict(),
        }))
        return
    click.echo(f"eval {model_name} ({checkpoint}) on {data}: {metrics['n']} image(s), {metrics['skipped']} skipped, "
               f"{view_recipe.name} eval view at {view_recipe.image_size} px, {metrics['seconds']:.1f} s")
    click.echo(f"  top-1      {table['top1_percent']:8.2f} %")
    click.echo(f"  top-5      {table['top5_percent']:8.2f} %")
    click.echo(f"  NLL        {table['nll']:8.4f} nats")
    click.echo(f"  ECE        {table['ece_percent']:8.2f} %  (15 bins)")
    click.echo(f"  AURC       {table['aurc_x1000']:8.2f} x 1000  (E-AURC {table['eaurc_x1000']:.2f} x 1000)")
