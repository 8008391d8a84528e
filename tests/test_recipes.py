"""Every paper recipe's --smoke size runs (tiny synthetic shards, random weights): recipes cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "pipelines" / "recipes").glob("*.py")
                 if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke(recipe):
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "pipelines" / "recipes" / recipe), "--smoke"], cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "top-1" in res.stdout
