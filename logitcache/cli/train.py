"""`logitcache train`: stage 2, train a student from a cache, online, or teacher-free."""

from __future__ import annotations

import sys

import click

from logitcache.cli.options import (
    data_option,
    device_option,
    out_option,
    reports_errors,
    resolve_workers,
    shards_option,
    teacher_precision_option,
    workers_option,
)


# ---------------------------------------------------------------- train (stage 2: students)
@click.command()
@data_option(help="training dataset: a manifest.json, or a directory/URL holding one")
@click.option("--val", default=None, help="validation dataset, evaluated after every epoch (same form as --data)")
@out_option("the run directory: config.json, metrics.jsonl, checkpoints/")
@click.option("--student", required=True, help="student architecture: torchvision name, timm:NAME, or ours")
@click.option("--init", default=None, help="the student's initial weights (local checkpoint or torchvision name)")
@click.option("--loss", required=True, help="ce | ls | kd | dkd | nkd | tf-kd | zipf-ls | tf-nkd | pskd | uskd")
@click.option("--loss-arg", "loss_args", multiple=True, metavar="KEY=VALUE",
              help="a loss hyper-parameter (repeatable), checked against the loss's arguments")
@click.option("--ce-weight", default=None, type=float, help="weight of the CE term (default: the method's paper)")
@click.option("--loss-weight", default=None, type=float, help="weight of the method's term(s) (default: paper)")
@click.option("--cache", default=None, help="soft labels (and views) from this cache")
@click.option("--group", default=None, help="teacher group inside --cache (optional when it holds one)")
@click.option("--teacher", default=None, help="online KD: run this teacher in the loop on the same views")
@click.option("--weights", default=None, help="the online teacher's weights (as dump --weights)")
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int, help="per process")
@click.option("--lr", default=0.1, show_default=True, type=float, help="peak learning rate")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"]))
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD)")
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "step"]))
@click.option("--step-milestones", default=None,
              help="epochs where the step schedule multiplies the lr by --step-gamma, e.g. 30,60,90 "
                   "(default: half and three quarters of --epochs)")
@click.option("--step-gamma", default=0.1, show_default=True, type=float)
@click.option("--warmup-epochs", default=0.0, show_default=True, type=float, help="linear warm-up (may be fractional)")
@click.option("--weight-decay", default=1e-4, show_default=True, type=float)
@click.option("--clip-grad", default=None, type=float, help="clip the gradient norm to this value")
@click.option("--label-smoothing", default=0.0, show_default=True, type=float, help="smooth the CE term's labels")
@click.option("--recipe", default=None,
              help="view recipe: imagenet | small | deit | tv-v2, newest version; NAME@V an older one, e.g. imagenet@1 "
                   "(default: the cache's with --cache, else the "
                   "data's default_recipe)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the recipe's)")
@workers_option("DataLoader workers per process; must divide --streams (the data order does not depend on it; "
                "the default is rounded down to a divisor)")
@device_option()
@teacher_precision_option("online KD: the teacher body's compute precision [default: bf16 on a GPU, fp32 on the "
                          "CPU]")
@click.option("--seed", default=0, show_default=True, type=int,
              help="model init, data order, and (without --cache) the views: the dump's seed gives the dump's views")
@shards_option()
@click.option("--checkpoint-every", default=0, show_default=True, type=int,
              help="also checkpoint every N optimizer steps (0: at the end of each epoch only)")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoints/last.pt (same result as no break)")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the student")
@click.option("--skip-bad", is_flag=True, help="skip corrupt samples (counted in metrics.jsonl) instead of stopping")
@click.option("--pskd-topk", default=None, type=int,
              help="pskd: classes kept per stored prediction (default: all, i.e. exactly the reference)")
@click.option("--views-per-decode", default=1, show_default=True, type=int,
              help="each decoded image yields its views for N consecutive epochs (a pass), spread over different "
                   "batches: less decoding per view; N must divide --epochs (and the cache's epochs)")
@click.option("--streams", default=None, type=click.IntRange(min=1),
              help="each process's shards are read in S streams, each shuffled and batched on its own, and the "
                   "batches taken round robin: the data order (so the curve) depends on S, not on --workers, which "
                   "must divide it; a --resume needs the run's S. Memory: S shuffle buffers per process, shared by "
                   "its workers [default: 8]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@reports_errors
def train(data, val, out, student, init, loss, loss_args, ce_weight, loss_weight, cache, group, teacher, weights,
          epochs, batch_size, lr, optimizer, momentum, nesterov, schedule, step_milestones, step_gamma, warmup_epochs,
          weight_decay, clip_grad, label_smoothing, recipe, image_size, workers, device, teacher_precision, seed,
          shard_selection, checkpoint_every, resume, compile_model, skip_bad, pskd_topk, views_per_decode, streams,
          no_progress):
    """Train a student: from a cache (--cache, the cached views replayed), online (--teacher), or teacher-free.

    One soft-label source per run. Under `torchrun --nproc-per-node N` ranks take disjoint shards and
    stay in lockstep. Writes OUT/config.json, OUT/metrics.jsonl (one line per epoch), OUT/val_reliability.json
    and OUT/checkpoints/{last,epoch-NNNN}.pt.
    """
    import os

    from logitcache.data.manifest import load_manifest
    from logitcache.data.split import parse_shard_selection
    from logitcache.replay import DEFAULT_STREAMS
    from logitcache.train.config import TrainConfig
    from logitcache.train.loop import train as run_train

    streams = DEFAULT_STREAMS if streams is None else streams

    try:
        milestones = (tuple(float(m) for m in step_milestones.split(",") if m.strip())
                      if step_milestones else None)
    except ValueError as e:
        raise click.BadParameter(f"--step-milestones must be comma-separated epochs, got {step_milestones!r}") from e
    shards_sel = None
    if shard_selection:
        shards_sel = tuple(parse_shard_selection(shard_selection, len(load_manifest(data).shards)))
    try:
        cfg = TrainConfig(
            data=data, val=val, out=out, student=student, init=init, loss=loss, loss_args=tuple(loss_args),
            ce_weight=ce_weight, loss_weight=loss_weight, cache=cache, group=group, teacher=teacher, weights=weights,
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum, nesterov=nesterov,
            schedule=schedule, step_milestones=milestones, step_gamma=step_gamma, warmup_epochs=warmup_epochs,
            weight_decay=weight_decay, clip_grad=clip_grad, label_smoothing=label_smoothing, recipe=recipe,
            image_size=image_size, workers=resolve_workers(workers, streams), device=device,
            teacher_precision=teacher_precision, seed=seed, shards=shards_sel,
            checkpoint_every=checkpoint_every, resume=resume, compile=compile_model, skip_bad=skip_bad,
            pskd_topk=pskd_topk, progress=not no_progress, views_per_decode=views_per_decode, streams=streams,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    line = run_train(cfg, argv=sys.argv)
    if line and int(os.environ.get("RANK", "0")) == 0:
        val_stats = line.get("val") or {}
        click.echo(f"trained {cfg.student} ({cfg.loss}, {cfg.mode}) to epoch {line['epoch']}: train loss "
                   f"{line['train']['loss']:.4f} top1 {line['train']['top1']:.4f}"
                   + (f"; val top1 {val_stats['top1']:.4f} ece {val_stats['ece']:.4f}" if val_stats else "")
                   + f"; run in {out}")
