"""The `logitcache` command line: one click group, one flag vocabulary (see CONTRACTS §1 / README).

Each command parses its flags and calls one library function. Heavy imports (torch, zarr) happen inside the
commands so that `logitcache --help` stays fast. Project errors (`LogitcacheError`) become a one-line
message and exit code 1 through `click.ClickException` (a click command that *returns* 1 exits 0).
"""

from __future__ import annotations

import functools
import sys

import click

from logitcache import __version__


def reports_errors(fn):
    """Turn project errors into `click.ClickException` (non-zero exit, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from logitcache.errors import LogitcacheError

        try:
            return fn(*args, **kwargs)
        except LogitcacheError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper


# ---------------------------------------------------------------- shared options (one vocabulary)
def data_option(required: bool = True, help: str = "dataset: a manifest.json, or a directory/URL holding one"):
    return click.option("--data", "data", required=required, help=help)


def out_option(help: str):
    return click.option("--out", "out", required=True, help=help)


def json_option():
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout, nothing else")


def device_option():
    return click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1")


def shards_option():
    return click.option(
        "--shards", "shard_selection", default=None,
        help="use part of the data: shard indices as a range '0-9' or list '0,3,5' (default: all)",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="logitcache")
def main() -> None:
    """logitcache: run a teacher once over replayable augmented views, cache its top-k logits in zarr,
    and train students from the cache (NKD, KD, DKD) or teacher-free (USKD, tf-NKD, ...)."""



def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise click.BadParameter(f"--temperatures must be comma-separated numbers, got {text!r}") from e


def _print_json(obj) -> None:
    import json

    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=str))


# ---------------------------------------------------------------- shards (the data: tar shards + manifest)
def _shard_size_options(fn):
    fn = click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1),
                      help="samples per shard")(fn)
    fn = click.option("--max-bytes", default=None, type=click.IntRange(min=1),
                      help="also close a shard before it would exceed this many bytes")(fn)
    fn = click.option("--overwrite", is_flag=True, help="replace a dataset already in --out")(fn)
    return fn


def _echo_manifest(what: str, m) -> None:
    click.echo(f"{what}: {len(m.shards)} shard(s), {m.num_samples} samples, {m.num_classes} classes, "
               f"fingerprint {m.fingerprint}")


@main.group()
def shards() -> None:
    """Write ImageNet-style webdataset shards (tar of <key>.jpg|png + <key>.cls) with a manifest.json,
    or build the manifest for shards someone else made. Output is deterministic."""


@shards.command("fashion-mnist")
@click.option("--src", default="/usr/share/datasets/fashion-mnist/", show_default=True,
              help="directory holding the IDX files (train/t10k-images/labels-idx*-ubyte[.gz])")
@out_option("directory to create: OUT/train and OUT/test, each with its manifest.json")
@_shard_size_options
@reports_errors
def shards_fashion_mnist(src, out, samples_per_shard, max_bytes, overwrite):
    """Fashion-MNIST from its IDX files: lossless grayscale PNGs, the 10 class names, file order kept."""
    from logitcache.shards import write_fashion_mnist

    manifests = write_fashion_mnist(src, out, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                                    overwrite=overwrite)
    for split, m in manifests.items():
        _echo_manifest(f"{out.rstrip('/')}/{split}", m)


@shards.command("folder")
@click.argument("src")
@out_option("directory (or URL) to create, with the shards and manifest.json")
@_shard_size_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="shuffle the files with this seed so each shard mixes classes")
@click.option("--no-shuffle", is_flag=True, help="keep sorted class order (shards then hold one class or two)")
@reports_errors
def shards_folder(src, out, samples_per_shard, max_bytes, overwrite, seed, no_shuffle):
    """An ImageFolder tree SRC/<class>/*.JPEG (e.g. ImageNet's train/): class index = sorted class order;
    image bytes are copied as they are, never re-encoded."""
    from logitcache.shards import write_image_folder

    m = write_image_folder(src, out, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                           shuffle_seed=None if no_shuffle else seed, overwrite=overwrite)
    _echo_manifest(out, m)


@shards.command("scan")
@click.argument("directory")
@click.option("--classes", "classes_file", default=None,
              help="class names: a text file with one per line, or a JSON list (index = position)")
@click.option("--num-classes", default=None, type=click.IntRange(min=1),
              help="number of classes when there are no names (default: the largest label + 1)")
@click.option("--force", is_flag=True, help="replace an existing DIRECTORY/manifest.json")
@json_option()
@reports_errors
def shards_scan(directory, classes_file, num_classes, force, as_json):
    """Write DIRECTORY/manifest.json for the *.tar shards in DIRECTORY (natural name order), reading each
    shard once for its size, sha256, key count and key digest."""
    import json

    import fsspec

    from logitcache.errors import ManifestError
    from logitcache.manifest import build_manifest, list_shards

    target = directory.rstrip("/") + "/manifest.json"
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path) and not force:
        raise ManifestError(f"{target} exists; pass --force to replace it")
    names = None
    if classes_file is not None:
        with fsspec.open(classes_file, "rt", encoding="utf-8") as f:
            text = f.read()
        names = json.loads(text) if classes_file.endswith(".json") else [ln.strip() for ln in text.splitlines()
                                                                          if ln.strip()]
    urls = list_shards(directory)
    if not urls:
        raise ManifestError(f"{directory}: no *.tar shards here")
    m = build_manifest(urls, names, num_classes=num_classes, base_url=directory)
    m.save(directory)
    if as_json:
        _print_json({"manifest": target, "shards": len(m.shards), "samples": m.num_samples,
                     "num_classes": m.num_classes, "fingerprint": m.fingerprint})
    else:
        _echo_manifest(target, m)


# ---------------------------------------------------------------- dump / info / verify (stage 1, the cache)
@main.command()
@click.option("--teacher", required=True, help="teacher architecture: torchvision name, timm:NAME, or ours")
@click.option("--weights", default=None, help="torchvision weights name (IMAGENET1K_V1) or a local checkpoint")
@data_option()
@out_option("the cache to create or extend (path or fsspec URL)")
@click.option("--group", default=None, help="teacher group inside the cache (default: the teacher's name)")
@click.option("--epochs", default=1, show_default=True, type=int, help="augmented views per sample (one per epoch)")
@click.option("--topk", default=10, show_default=True, type=int, help="k: teacher logits kept per view")
@click.option("--temperatures", default="1", show_default=True, help="temperatures to record, e.g. 1,4 (1 always)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--recipe", default="imagenet", show_default=True, help="view recipe: imagenet | small")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the recipe's)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=0, show_default=True, type=int, help="DataLoader workers")
@device_option()
@shards_option()
@click.option("--value-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="dtype of the stored top-k log-probabilities")
@click.option("--skip-bad", is_flag=True, help="skip corrupt samples (counted and reported) instead of stopping")
@click.option("--repair", is_flag=True, help="verify the cache first and redo exactly the damaged units")
@click.option("--dry-run", is_flag=True, help="print the plan (units, views, bytes) and write nothing")
@json_option()
@reports_errors
def dump(teacher, weights, data, out, group, epochs, topk, temperatures, seed, recipe, image_size, batch_size,
         workers, device, shard_selection, value_dtype, skip_bad, repair, dry_run, as_json):
    """Run a teacher once over augmented views of --data and store its top-k logits in --out.

    Resumable: rerun the same command after an interruption and it finishes the unfinished units.
    Under `torchrun --nproc-per-node N` ranks take disjoint shards.
    """
    from logitcache.dump import DumpConfig, plan
    from logitcache.dump import dump as run_dump
    from logitcache.shards import parse_shard_selection

    cfg = DumpConfig(
        data=data, out=out, teacher=teacher, weights=weights, group=group, epochs=epochs, topk=topk,
        temperatures=parse_temperatures(temperatures), seed=seed, recipe=recipe, image_size=image_size,
        batch_size=batch_size, workers=workers, device=device, value_dtype=value_dtype, skip_bad=skip_bad,
        repair=repair, shards=tuple(parse_shard_selection(shard_selection)) if shard_selection else None,
        progress=not as_json,
    )
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


@main.command()
@click.argument("cache")
@click.option("--group", default=None, help="show one teacher group (default: all)")
@json_option()
@reports_errors
def info(cache, group, as_json):
    """Show who/what made CACHE: teacher, weights digest, data fingerprint, recipe, k, size, bytes/view."""
    from logitcache.verify import cache_info

    d = cache_info(cache)
    if group is not None:
        if group not in d["groups"]:
            raise click.ClickException(f"{cache} has no group '{group}' (it has {sorted(d['groups'])})")
        d["groups"] = {group: d["groups"][group]}
    if as_json:
        _print_json(d)
        return
    root = d["root"]
    click.echo(f"cache              {cache}")
    click.echo(f"format             {root['format']} {'.'.join(map(str, root['format_version']))}")
    click.echo(f"dataset            fingerprint {root['dataset_fingerprint']}")
    click.echo(f"                   {root['num_shards']} shards, {sum(root['shard_lengths'])} samples, "
               f"{root['num_classes']} classes")
    for name, g in d["groups"].items():
        click.echo(f"group {name}")
        click.echo(f"  teacher          {g['teacher']}  weights {g['weights']}")
        click.echo(f"  weights sha256   {g['weights_digest']}")
        click.echo(f"  recipe           {g['recipe']}")
        click.echo(f"  k / temperatures {g['k']} / {g['temperatures']}   seed {g['seed']}   "
                   f"values {g['value_dtype']}")
        covered = "all shards" if g["shards"] is None else f"{len(g['shards'])} of {root['num_shards']} shards"
        click.echo(f"  units            {g['units_finished']}/{g['units_total']} finished "
                   f"({g['epochs']} epoch(s) x {covered})")
        bpv = f"{g['bytes_per_view']:.1f}" if g["bytes_per_view"] else "-"
        click.echo(f"  size             {g['bytes']} bytes, {g['views']} views, {bpv} B/view")
        if g["teacher_top1"] is not None:
            click.echo(f"  teacher on views top-1 {100 * g['teacher_top1']:.2f}%, mean top-k mass "
                       f"{g['mean_topk_mass']:.4f}, {g['samples_skipped']} sample(s) skipped")
        for p in g["provenance"]:
            click.echo(f"  made by          logitcache {p.get('tool_version')} ({p.get('git_commit')}), "
                       f"torch {p.get('torch')}, {p.get('start_time')} .. {p.get('end_time')}")
            click.echo(f"                   $ {p.get('command_line')}")


@main.command()
@click.argument("cache")
@click.option("--group", default=None, help="teacher group (optional when the cache holds one)")
@data_option(required=False, help="also check that these shards are the ones the cache was made from")
@click.option("--recompute", default=0, type=int, help="recompute N random cached views with --teacher/--weights")
@click.option("--teacher", default=None, help="with --recompute: the teacher architecture")
@click.option("--weights", default=None, help="with --recompute: the weights to check the cache against")
@click.option("--tolerance", default=0.05, show_default=True, type=float,
              help="with --recompute: largest allowed |log-prob difference| per view")
@device_option()
@json_option()
@reports_errors
def verify(cache, group, data, recompute, teacher, weights, tolerance, device, as_json):
    """Check CACHE: every unit finished, every chunk intact (checksums), values sane; with --data, the
    shards match; with --recompute N, N random views recomputed by the teacher match. Exits non-zero on any
    problem, naming each bad unit."""
    from logitcache.verify import recompute_views, verify_cache

    if recompute and (teacher is None or data is None):
        raise click.UsageError("--recompute needs --teacher (and --weights) and --data")
    report = verify_cache(cache, group, data=data)
    if recompute:
        rc = recompute_views(cache, group, data, teacher, weights, recompute, device=device, tolerance=tolerance)
        report.recompute = rc
        if not rc["weights_digest_equal"]:
            report.add("teacher weights", f"digest {rc['weights_digest_given'][:16]}… of the weights given != "
                       f"{rc['weights_digest_cache'][:16]}… recorded in the cache")
        for m in rc["mismatches"]:
            report.add(f"view (epoch {m['epoch']}, shard {m['shard']}, row {m['offset']}) {m['sample']}",
                       f"recomputed log-probs differ by {m['max_abs_logprob_diff']:.4f} > {tolerance}",
                       epoch=m["epoch"], shard=m["shard"])
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(f"verify {cache} group {report.group}: {report.units_checked} finished unit(s) checked")
        if report.recompute:
            rc = report.recompute
            click.echo(f"  recomputed {rc['views']} view(s): largest |log-prob difference| "
                       f"{rc['max_abs_logprob_diff']:.2e}, {len(rc['mismatches'])} over {rc['tolerance']}")
        for p in report.problems:
            click.echo(f"  BAD {p['where']}: {p['what']}")
        click.echo("OK" if report.ok else f"FAILED: {len(report.problems)} problem(s) in "
                   f"{len(report.bad_units())} unit(s)")
    if not report.ok:
        raise SystemExit(1)


# ---------------------------------------------------------------- train (stage 2: students)
@main.command()
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
@click.option("--weights", default=None, help="the online teacher's weights (torchvision name or local file)")
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
              help="view recipe: imagenet | small (default: the cache's with --cache, else imagenet)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the recipe's)")
@click.option("--workers", default=0, show_default=True, type=int, help="DataLoader workers per process")
@device_option()
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
@click.option("--no-progress", is_flag=True, help="no progress bar")
@reports_errors
def train(data, val, out, student, init, loss, loss_args, ce_weight, loss_weight, cache, group, teacher, weights,
          epochs, batch_size, lr, optimizer, momentum, nesterov, schedule, step_milestones, step_gamma, warmup_epochs,
          weight_decay, clip_grad, label_smoothing, recipe, image_size, workers, device, seed, shard_selection,
          checkpoint_every, resume, compile_model, skip_bad, pskd_topk, no_progress):
    """Train a student: from a cache (--cache, the cached views replayed), online (--teacher), or teacher-free.

    One soft-label source per run. Under `torchrun --nproc-per-node N` ranks take disjoint shards and
    stay in lockstep. Writes OUT/config.json, OUT/metrics.jsonl (one line per epoch), OUT/val_reliability.json
    and OUT/checkpoints/{last,epoch-NNNN}.pt.
    """
    import os

    from logitcache.manifest import load_manifest
    from logitcache.shards import parse_shard_selection
    from logitcache.train import TrainConfig
    from logitcache.train import train as run_train

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
            image_size=image_size, workers=workers, device=device, seed=seed, shards=shards_sel,
            checkpoint_every=checkpoint_every, resume=resume, compile=compile_model, skip_bad=skip_bad,
            pskd_topk=pskd_topk, progress=not no_progress,
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


@main.command("eval")
@click.option("--model", "model_name", default=None,
              help="architecture of the checkpoint (default: the student recorded in one of our checkpoints)")
@click.option("--checkpoint", required=True,
              help="our training checkpoint (RUN/checkpoints/last.pt) or a state_dict file; read weights-only")
@data_option()
@click.option("--recipe", default=None, help="view recipe whose eval view is used: imagenet | small "
              "(default: the checkpoint's, else small for models made for <= 64 px inputs, else imagenet)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the checkpoint's, "
              "else the model's own)")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader workers")
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
    import os

    from logitcache.dump import dist_env
    from logitcache.evaluate import (
        evaluate,
        load_model_for_eval,
        paper_units,
        recorded_settings,
        resolve_eval_recipe,
    )
    from logitcache.manifest import load_manifest
    from logitcache.models import load_checkpoint
    from logitcache.shards import parse_shard_selection

    rank, world = dist_env()
    if device == "cuda" and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    manifest = load_manifest(data)
    obj = load_checkpoint(checkpoint)
    recorded = recorded_settings(checkpoint, obj)
    if model_name is not None and recorded["student"] not in (None, model_name):
        recorded = {"student": None, "recipe": None, "image_size": None}  # another model: its settings do not apply
    model_name = model_name or recorded["student"]
    if not model_name:
        raise click.UsageError(f"{checkpoint} does not record its architecture; pass --model NAME")
    view_recipe = resolve_eval_recipe(model_name, recorded, recipe, image_size)
    model = load_model_for_eval(model_name, checkpoint, manifest.num_classes, view_recipe.image_size,
                                checkpoint_obj=obj).to(device)
    shards = parse_shard_selection(shard_selection, len(manifest.shards)) if shard_selection else None
    metrics, reliability = evaluate(model, manifest, view_recipe, batch_size=batch_size, workers=workers,
                                    device=device, shards=shards, skip_bad=skip_bad, model_name=model_name,
                                    progress=not as_json)
    if rank != 0:
        return
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


# ---------------------------------------------------------------- plot (figures of a run directory)
@main.command()
@click.argument("run", nargs=-1, required=True)
@click.option("--out", "out", default=None,
              help="directory for the PNGs (default: RUN/plots; with several runs, required)")
@click.option("--label", "labels", multiple=True, help="with several runs: a legend label per run, in order")
@reports_errors
def plot(run, out, labels):
    """Draw RUN's training curves (loss and its terms, val top-1 and ECE per epoch) and its reliability diagram
    to PNG. With several runs, also one figure comparing their val top-1 per epoch (compare.png)."""
    from logitcache.plots import compare_runs, plot_run

    if len(run) > 1 and out is None:
        raise click.UsageError("with several runs, pass --out DIR for the figures")
    if labels and len(labels) != len(run):
        raise click.UsageError(f"{len(labels)} --label for {len(run)} runs")
    written = []
    for r in run:
        name = r.rstrip("/").split("/")[-1]
        written += plot_run(r, out if len(run) == 1 else f"{out.rstrip('/')}/{name}")
    if len(run) > 1:
        written.append(compare_runs(run, f"{out.rstrip('/')}/compare.png", labels=labels or None))
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
