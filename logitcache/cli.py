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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
