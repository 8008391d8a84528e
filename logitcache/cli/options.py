"""The CLI's shared pieces: the one flag vocabulary (CONTRACTS §1) as reusable options, error handling, output."""

from __future__ import annotations

import functools

import click


def reports_errors(fn):
    """Turn project errors into `click.ClickException` (non-zero exit, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from logitcache.errors import LogitcacheError

        try:
            return fn(*args, **kwargs)
        except LogitcacheError as e:
            raise click.ClickException(f"{type(e).__name__}: {worker_message(e)}") from e

    return wrapper


def worker_message(e: Exception) -> str:
    """``e``'s message; for an error raised in a DataLoader worker (torch re-raises it in the main process with
    the worker's traceback as its message), the original message alone, so the user sees no traceback."""
    import re

    msg = str(e)
    if "Original Traceback (most recent call last):" not in msg:
        return msg
    starts = list(re.finditer(rf"(?m)^(?:[\w.]+\.)?{re.escape(type(e).__name__)}: ", msg))
    return msg[starts[-1].end():].rstrip() if starts else msg.rstrip().splitlines()[-1]


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


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise click.BadParameter(f"--temperatures must be comma-separated numbers, got {text!r}") from e


def _print_json(obj) -> None:
    import json

    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=str))




def workers_option(help: str = "DataLoader workers per process"):
    """``--workers``; when not given, `resolve_workers` derives it from the cores (`runtime.dist.default_workers`)."""
    return click.option("--workers", default=None, type=click.IntRange(min=0),
                        help=f"{help} [default: min(8, cores available / processes on this machine - 1)]")


def resolve_workers(workers: int | None, streams: int | None = None) -> int:
    """``--workers`` as given, else the default; with ``streams`` (train) the default is the largest divisor of
    ``streams`` not above it (each worker hosts whole streams), e.g. 7 -> 4 with 8 streams."""
    from logitcache.runtime.dist import default_workers  # lazy: `logitcache --help` stays fast

    if workers is not None:
        return workers
    workers = default_workers()
    if streams is not None and workers > 1:
        workers = max(d for d in range(1, workers + 1) if streams % d == 0)
    return workers


def teacher_precision_option(help: str):
    return click.option("--teacher-precision", "teacher_precision", default=None,
                        type=click.Choice(["fp32", "bf16", "fp16"]), help=help)
