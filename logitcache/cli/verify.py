"""`logitcache verify`: completeness, checksums, sanity, data, recomputed views."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    _print_json,
    data_option,
    device_option,
    json_option,
    reports_errors,
    teacher_precision_option,
)


# ---------------------------------------------------------------- dump / info / verify (stage 1, the cache)
@click.command()
@click.argument("cache")
@click.option("--group", default=None, help="teacher group (optional when the cache holds one)")
@data_option(required=False, help="also check that these shards are the ones the cache was made from")
@click.option("--recompute", default=0, type=int, help="recompute N random cached views with --teacher/--weights")
@click.option("--teacher", default=None, help="with --recompute: the teacher architecture")
@click.option("--weights", default=None, help="with --recompute: the weights to check the cache against")
@click.option("--tolerance", default=None, type=float,
              help="with --recompute: largest allowed |log-prob difference| per view beyond the stored dtype's "
                   "rounding [default: from the measured error of the two teacher precisions, FORMAT.md]")
@device_option()
@teacher_precision_option("with --recompute: the recomputing teacher's precision [default: the cache's]")
@json_option()
@reports_errors
def verify(cache, group, data, recompute, teacher, weights, tolerance, device, teacher_precision, as_json):
    """Check CACHE: every unit finished, every chunk intact (checksums), values sane; with --data, the
    shards match; with --recompute N, N random views recomputed by the teacher match. Exits non-zero on any
    problem, naming each bad unit."""
    from logitcache.cache.verify import recompute_views, verify_cache
    from logitcache.errors import CacheMetadataError

    if recompute and (teacher is None or data is None):
        raise click.UsageError("--recompute needs --teacher (and --weights) and --data")
    try:
        report = verify_cache(cache, group, data=data)
    except CacheMetadataError as e:  # metadata, not damage to units: reported as such, nothing blamed on units
        if as_json:
            _print_json({"cache": cache, "group": group, "ok": False, "metadata_ok": False, "units_checked": 0,
                         "problems": [{"where": "metadata", "what": str(e)}], "bad_units": [], "recompute": None})
        else:
            click.echo(f"verify {cache}: BAD metadata: {e}")
            click.echo("FAILED: the cache's metadata is invalid (not damage to units: `dump --repair` refuses "
                       "to run on it)")
        raise SystemExit(1) from None
    if recompute:
        rc = recompute_views(cache, group, data, teacher, weights, recompute, device=device, tolerance=tolerance,
                             teacher_precision=teacher_precision)
        report.recompute = rc
        if not rc["weights_digest_equal"]:
            report.add("teacher weights", f"digest {rc['weights_digest_given'][:16]}… of the weights given != "
                       f"{rc['weights_digest_cache'][:16]}… recorded in the cache")
        for m in rc["mismatches"]:
            report.add(f"view (epoch {m['epoch']}, shard {m['shard']}, row {m['offset']}) {m['sample']}",
                       f"recomputed log-probs differ by {m['max_abs_logprob_diff']:.4f} > {rc['tolerance']}",
                       epoch=m["epoch"], shard=m["shard"])
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(f"verify {cache} group {report.group}: {report.units_checked} finished unit(s) checked")
        if report.recompute:
            rc = report.recompute
            click.echo(f"  recomputed {rc['views']} view(s) at {rc['teacher_precision']} (cache: "
                       f"{rc['cache_teacher_precision']}): largest |log-prob difference| "
                       f"{rc['max_abs_logprob_diff']:.2e}, {len(rc['mismatches'])} over {rc['tolerance']:.3g}")
        for p in report.problems:
            click.echo(f"  BAD {p['where']}: {p['what']}")
        click.echo("OK" if report.ok else f"FAILED: {len(report.problems)} problem(s) in "
                   f"{len(report.bad_units())} unit(s)")
    if not report.ok:
        raise SystemExit(1)


# ---------------------------------------------------------------- train (stage 2: students)
