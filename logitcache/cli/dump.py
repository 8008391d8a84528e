"""`logitcache dump`: stage 1, run a teacher once over augmented views into a cache."""

from __future__ import annotations

import sys

import click

from logitcache.cli.options import (
    _print_json,
    data_option,
    device_option,
    json_option,
    out_option,
    parse_temperatures,
    reports_errors,
    resolve_workers,
    shards_option,
    teacher_precision_option,
    workers_option,
)


# ---------------------------------------------------------------- dump / info / verify (stage 1, the cache)
@click.command()
@click.option("--teacher", required=True, help="teacher architecture: torchvision name, timm:NAME, or ours")
@click.option("--weights", default=None, help="a weights file (.safetensors recommended, or a torch state_dict), a "
              "torchvision weights name (IMAGENET1K_V1), or for timm:NAME hf-hub:OWNER/REPO or pretrained")
@data_option()
@out_option("the cache to create or extend (path or fsspec URL)")
@click.option("--group", default=None, help="teacher group inside the cache (default: the teacher's name)")
@click.option("--epochs", default=1, show_default=True, type=int, help="augmented views per sample (one per epoch)")
@click.option("--topk", default=10, show_default=True, type=int, help="k: teacher logits kept per view")
@click.option("--temperatures", default="1", show_default=True, help="temperatures to record, e.g. 1,4 (1 always)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--recipe", default=None,
              help="view recipe: imagenet | small | deit | tv-v2, newest version; NAME@V an older one, e.g. imagenet@1 "
                   "(default: the group's when it exists, else the "
                   "data's default_recipe)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the recipe's)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@workers_option("DataLoader workers (decoding and views) per process")
@device_option()
@teacher_precision_option("the teacher body's compute precision, recorded in the group (reductions are float32 "
                          "whatever it is) [default: bf16 on a GPU, fp32 on the CPU]")
@shards_option()
@click.option("--value-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="format 1: dtype of the stored top-k log-probabilities")
@click.option("--tail", default="uniform", show_default=True,
              help="how the mass outside the top-k is reconstructed: uniform | prior (class-conditional, 0 B/view) "
                   "| sampled[:M] (M classes with importance weights, unbiased; default M=8); format 2")
@click.option("--codec", default=None,
              help="format 2's value coding, as `info` names it (default packed-q6): "
                   "packed-q<B>[-knee<N>][-r<R>][-blosc] stores log-probabilities "
                   "at 2^-B nats, those over N nats below the top-1 at 2^-(B-1), the rest field at 2^-R; -blosc "
                   "compresses as caches before the lzma compressor did. packed-q5 is ~1.4 B/view smaller at "
                   "k=10 (README 'Storage frontier'; `probe --codecs` measures codings on your teacher)")
@click.option("--format", "cache_format", default=2, show_default=True, type=click.IntRange(1, 2),
              help="format of a NEW cache (an existing cache keeps its own)")
@click.option("--prior-views", default=None, type=int,
              help="--tail prior: calibration views (epoch 0, first shards; default 20 per class)")
@click.option("--skip-bad", is_flag=True, help="skip corrupt samples (counted and reported) instead of stopping")
@click.option("--repair", is_flag=True, help="verify the cache first and redo exactly the damaged units")
@click.option("--dry-run", is_flag=True, help="print the plan (units, views, bytes) and write nothing")
@json_option()
@reports_errors
def dump(teacher, weights, data, out, group, epochs, topk, temperatures, seed, recipe, image_size, batch_size,
         workers, device, teacher_precision, shard_selection, value_dtype, tail, codec, cache_format, prior_views,
         skip_bad, repair, dry_run, as_json):
    """Run a teacher once over augmented views of --data and store its top-k logits in --out.

    Resumable: rerun the same command after an interruption and it finishes the unfinished units.
    Under `torchrun --nproc-per-node N` ranks take disjoint shards.
    """
    from logitcache.data.split import parse_shard_selection
    from logitcache.dump import DumpConfig, plan
    from logitcache.dump import dump as run_dump

    try:
        cfg = DumpConfig(
            data=data, out=out, teacher=teacher, weights=weights, group=group, epochs=epochs, topk=topk,
            temperatures=parse_temperatures(temperatures), seed=seed, recipe=recipe, image_size=image_size,
            batch_size=batch_size, workers=resolve_workers(workers), device=device, value_dtype=value_dtype,
            skip_bad=skip_bad, teacher_precision=teacher_precision,
            repair=repair, shards=tuple(parse_shard_selection(shard_selection)) if shard_selection else None,
            progress=not as_json, tail=tail, format=cache_format, prior_views=prior_views,
            **({"codec": codec} if codec else {}),
        )
    except ValueError as e:  # a setting out of range: the user's input, said without a traceback
        raise click.UsageError(str(e)) from None
    if dry_run:
        p = plan(cfg)
        if as_json:
            _print_json(p)
        else:
            for k, v in p.items():
                click.echo(f"{k:32s} {v}")
        return
    summary = run_dump(cfg, argv=sys.argv)
    if as_json:
        _print_json(summary.to_json())
        return
    s = summary
    click.echo(
        f"dump {s.group}: {s.units_written} unit(s) written, {s.units_skipped_done} already done; "
        f"{s.views_written} views in the cache, {s.bytes_on_disk} bytes on disk, {s.bytes_per_view:.1f} B/view; "
        f"teacher top-1 on the views {100 * s.teacher_top1:.2f}%, mean top-{cfg.topk} mass {s.mean_topk_mass:.4f}; "
        f"{s.samples_skipped} sample(s) skipped; {s.seconds:.1f} s"
    )
