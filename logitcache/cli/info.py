"""`logitcache info`: who and what made a cache."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    _print_json,
    json_option,
    reports_errors,
)


# ---------------------------------------------------------------- dump / info / verify (stage 1, the cache)
@click.command()
@click.argument("cache")
@click.option("--group", default=None, help="show one teacher group (default: all)")
@json_option()
@reports_errors
def info(cache, group, as_json):
    """Show who/what made CACHE: teacher, weights digest, data fingerprint, recipe, k, size, bytes/view."""
    from logitcache.cache.verify import cache_info

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
        click.echo(f"  precision        teacher body {g['teacher_precision']}, reductions float32"
                   + ("" if g["teacher_precision_recorded"] else
                      "  (not recorded: a dump before it was; inferred from its --device: cuda -> bf16, else fp32)"))
        click.echo(f"  recipe           {g['recipe']}")
        click.echo(f"  k / temperatures {g['k']} / {g['temperatures']}   seed {g['seed']}")
        click.echo(f"  format / codec   {g['format']} / {g['codec']}   tail {g['tail']}")
        covered = "all shards" if g["shards"] is None else f"{len(g['shards'])} of {root['num_shards']} shards"
        click.echo(f"  units            {g['units_finished']}/{g['units_total']} finished "
                   f"({g['epochs']} epoch(s) x {covered})")
        bpv = f"{g['bytes_per_view']:.1f}" if g["bytes_per_view"] else "-"
        click.echo(f"  size             {g['bytes']} bytes, {g['views']} views, {bpv} B/view")
        if g.get("allocated_bytes") is not None and g.get("objects_per_unit") is not None:
            click.echo(f"  on local disk    {g['allocated_bytes']} bytes allocated (du), {g['objects']} objects, "
                       f"{g['objects_per_unit']:.1f} per finished unit")
        if g["teacher_top1"] is not None:
            click.echo(f"  teacher on views top-1 {100 * g['teacher_top1']:.2f}%, mean top-k mass "
                       f"{g['mean_topk_mass']:.4f}, {g['samples_skipped']} sample(s) skipped")
        for p in g["provenance"]:
            click.echo(f"  made by          logitcache {p.get('tool_version')} ({p.get('git_commit')}), "
                       f"torch {p.get('torch')}, {p.get('start_time')} .. {p.get('end_time')}")
            click.echo(f"                   $ {p.get('command_line')}")
