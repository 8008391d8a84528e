"""The `logitcache` command line: one click group, one flag vocabulary (see CONTRACTS §1 / README).

Each command parses its flags and calls one library function. Heavy imports (torch, zarr) happen inside the
commands so that `logitcache --help` stays fast. Project errors (`LogitcacheError`) become a one-line
message and exit code 1 through `click.ClickException` (a click command that *returns* 1 exits 0).
"""

from __future__ import annotations

import click

from logitcache import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="logitcache")
def main() -> None:
    """logitcache: run a teacher once over replayable augmented views, cache its top-k logits in zarr,
    and train students from the cache (NKD, KD, DKD) or teacher-free (USKD, tf-NKD, ...)."""





# one thin module per command; each imports the heavy library (torch, zarr) inside its function, so
# `logitcache --help` stays fast: those are the only function-level project imports in the package
from logitcache.cli.dump import dump  # noqa: E402
from logitcache.cli.eval import eval_command  # noqa: E402
from logitcache.cli.info import info  # noqa: E402
from logitcache.cli.plot import plot  # noqa: E402
from logitcache.cli.probe import probe  # noqa: E402
from logitcache.cli.shards import shards  # noqa: E402
from logitcache.cli.train import train  # noqa: E402
from logitcache.cli.verify import verify  # noqa: E402

for _command in (shards, dump, probe, info, verify, train, eval_command, plot):
    main.add_command(_command)
