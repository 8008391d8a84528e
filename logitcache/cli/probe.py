"""`logitcache probe`: measure what a cache of this teacher keeps, per k and setting, and recommend one."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    _print_json,
    data_option,
    device_option,
    json_option,
    parse_temperatures,
    reports_errors,
    resolve_workers,
    shards_option,
    teacher_precision_option,
    workers_option,
)


@click.command()
@click.option("--teacher", required=True, help="teacher architecture (as for dump)")
@click.option("--weights", default=None, help="the teacher's weights (as for dump)")
@data_option()
@click.option("--views", default=512, show_default=True, type=int, help="epoch-0 views to run the teacher over")
@click.option("--ks", default="1,5,10,20", show_default=True, help="values of k to measure (clipped to C)")
@click.option("--temperatures", default="1,4", show_default=True,
              help="temperatures the dump would record (4 gives the KD T=4 gradient error)")
@click.option("--target-grad-error", default=0.02, show_default=True, type=float,
              help="recommend the cheapest setting whose NKD-gradient relative error is at most this")
@click.option("--tail", "tails", default="uniform,prior,sampled", show_default=True,
              help="the tail rules to measure in format 2, comma-separated, named as for `dump --tail` "
                   "(format 1 is always measured as the reference)")
@click.option("--codecs", default=None,
              help="format 2's value codings to measure with each tail, comma-separated, named as for `dump --codec` "
                   "(default packed-q6; e.g. packed-q6,packed-q5,packed-q4-knee4)")
@click.option("--tail-samples", default=8, show_default=True, type=int, help="M of the sampled:M tail measured")
@click.option("--draws", default=256, show_default=True, type=int,
              help="sampled tails: fresh tail draws whose mean gradient gives the error in expectation (0: off)")
@click.option("--seed", default=0, show_default=True, type=int, help="the dump's seed (which views are drawn)")
@click.option("--recipe", default=None, help="view recipe (default: the data's default_recipe)")
@click.option("--image-size", default=None, type=int, help="model input size in px (default: the recipe's)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@workers_option("DataLoader workers (decoding and views)")
@device_option()
@teacher_precision_option("the teacher body's compute precision [default: bf16 on a GPU, fp32 on the CPU]")
@shards_option()
@click.option("--skip-bad", is_flag=True, help="skip corrupt samples instead of stopping")
@json_option()
@reports_errors
def probe(teacher, weights, data, views, ks, temperatures, target_grad_error, tails, codecs, tail_samples, draws, seed,
          recipe, image_size, batch_size, workers, device, teacher_precision, shard_selection, skip_bad, as_json):
    """Run the teacher over --views views of --data and print, per k and cache setting, the top-k mass,
    KL(dense || cache), the KD/DKD/NKD gradient errors and the bytes per view; then recommend the cheapest
    setting meeting --target-grad-error (on the NKD gradient)."""
    from logitcache.data.manifest import load_manifest
    from logitcache.data.split import parse_shard_selection
    from logitcache.probe import ProbeConfig, ProbeError
    from logitcache.probe import probe as run_probe

    try:
        k_list = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise click.BadParameter(f"--ks must be comma-separated integers, got {ks!r}") from None
    shards = None
    if shard_selection:
        shards = tuple(parse_shard_selection(shard_selection, len(load_manifest(data).shards)))
    try:
        cfg = ProbeConfig(data=data, teacher=teacher, weights=weights, recipe=recipe, image_size=image_size,
                          shards=shards, batch_size=batch_size, workers=resolve_workers(workers), seed=seed,
                          device=device, teacher_precision=teacher_precision, views=views, ks=k_list,
                          temperatures=parse_temperatures(temperatures), target_grad_error=target_grad_error,
                          tail_samples=tail_samples, draws=draws, skip_bad=skip_bad,
                          tails=tuple(t.strip() for t in tails.split(",") if t.strip()),
                          **({"codecs": tuple(c.strip() for c in codecs.split(",") if c.strip())} if codecs else {}))
    except ProbeError as e:
        raise click.UsageError(str(e)) from None
    report = run_probe(cfg)
    if as_json:
        _print_json(report)
        return
    for line in format_report(report):
        click.echo(line)


def format_report(r: dict) -> list[str]:
    nan = float("nan")
    temps = ",".join(f"{t:g}" for t in r["temperatures"])
    w = max([20, *(len(row["setting"]) for row in r["rows"])])
    lines = [
        f"probe {r['teacher']} on {r['data']}: {r['views']} epoch-0 views of shards {r['shards_probed']} "
        f"(recipe {r['recipe']['name']}, {r['recipe'].get('image_size')} px), C = {r['num_classes']}, "
        f"temperatures {temps}",
        f"teacher top-1 on the views {100 * r['teacher_top1']:.1f} %, mean top-1 probability "
        f"{r['mean_top1_prob']:.3f}",
        f"{'k':>4} {'top-k mass':>10}  {'setting':<{w}} {'B/view':>7} {'prior kB':>8} {'KL T=1':>8} "
        f"{'KD4 grad':>8} {'DKD grad':>8} {'NKD grad':>8} {'NKD exp.':>8}",
    ]
    for row in r["rows"]:
        exp = f"{100 * row['expected_relerr_nkd_T1']:7.2f}%" if "expected_relerr_nkd_T1" in row else f"{'-':>8}"
        lines.append(
            f"{row['k']:>4} {row['mean_topk_mass']:>10.4f}  {row['setting']:<{w}} {row['dump_bytes_per_view']:7.2f} "
            f"{row['prior_bytes'] / 1e3:8.1f} {row['kl_T1']:8.4f} {100 * row.get('grad_relerr_kd_T4', nan):7.2f}% "
            f"{100 * row['grad_relerr_dkd_T1']:7.2f}% {100 * row['grad_relerr_nkd_T1']:7.2f}% {exp}")
    lines.append("B/view: stored chunk bytes per view + one unit record per shard of views; the prior tail's "
                 "matrix is stored once per group (prior kB). Gradient errors: relative, vs the dense teacher; "
                 "sampled: one draw, and 'NKD exp.' the error of the mean gradient over --draws fresh draws (on "
                 "the first views; what SGD averages, each cached view carrying its own draw).")
    target = 100 * r["target_grad_error"]
    rec, close = r["recommendation"], r["closest"]
    if rec is not None:
        lines.append(f"recommended: k = {rec['k']}, {rec['setting']}: NKD gradient error "
                     f"{100 * rec['grad_relerr_nkd_T1']:.2f} % <= {target:g} % at {rec['dump_bytes_per_view']:.1f} "
                     f"B/view" + (f" + {rec['prior_bytes'] / 1e3:.1f} kB per group" if rec["prior_bytes"] else ""))
        lines.append(f"  logitcache dump ... {rec['dump_flags']}")
    else:
        lines.append(f"NO setting measured meets --target-grad-error {r['target_grad_error']:g} (NKD gradient "
                     f"error <= {target:g} %). Closest: k = {close['k']}, {close['setting']} at "
                     f"{100 * close['grad_relerr_nkd_T1']:.2f} % ({close['dump_bytes_per_view']:.1f} B/view; "
                     f"dump flags: {close['dump_flags']}). Try a larger --ks or a looser target.")
    exp = r.get("in_expectation")
    if exp is not None:
        lines.append(f"in expectation{' (cheaper)' if rec is not None else ''}: k = {exp['k']}, {exp['setting']}: "
                     f"NKD gradient error {100 * exp['expected_relerr_nkd_T1']:.2f} % <= {target:g} % as the mean "
                     f"over {exp['draws']} tail draws (Monte-Carlo floor {100 * exp['mc_floor_nkd_T1']:.2f} %), "
                     f"{100 * exp['grad_relerr_nkd_T1']:.1f} % for one draw, at {exp['dump_bytes_per_view']:.1f} "
                     f"B/view: unbiased, but each view's gradient carries its draw's noise")
        lines.append(f"  logitcache dump ... {exp['dump_flags']}")
    return lines
