"""Provenance recorded in every cache and every run directory: who/what/when made it."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from logitcache import __version__


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout logitcache runs from (None when installed from a wheel)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """A JSON-able record of this run; add ``end_time`` when it ends."""
    import torch
    import torchvision

    return {
        "tool": "logitcache",
        "tool_version": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "command_line": shlex.join(argv if argv is not None else sys.argv),
        "rank_count": int(os.environ.get("WORLD_SIZE", "1")),
        "start_time": utc_now(),
    }
