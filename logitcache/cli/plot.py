"""`logitcache plot`: training curves and reliability diagrams of run directories."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    reports_errors,
)


# ---------------------------------------------------------------- plot (figures of a run directory)
@click.command()
@click.argument("run", nargs=-1, required=True)
@click.option("--out", "out", default=None,
              help="directory for the PNGs (default: RUN/plots; with several runs, required)")
@click.option("--label", "labels", multiple=True, help="with several runs: a legend label per run, in order")
@reports_errors
def plot(run, out, labels):
    """Draw RUN's training curves (loss and its terms, val top-1 and ECE per epoch) and its reliability diagram
    to PNG. With several runs, also one figure comparing their val top-1 per epoch (compare.png)."""
    from logitcache.eval.plots import compare_runs, plot_run

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
