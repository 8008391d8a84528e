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


@pytest.mark.slow
def test_a_recipe_launches_itself_under_torchrun():
    """--nproc-per-node 2: the dump and the training run as 2-process torchrun jobs (gloo on the CPU), each
    process with its share of the paper's global batch."""
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "pipelines" / "recipes" / "imagenet_nkd_resnet34_resnet18.py"),
                          "--smoke", "--nproc-per-node", "2"], cwd=repo, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    prefix = "$ torchrun --standalone --nproc-per-node 2 -m logitcache.cli "
    launched = [line[len(prefix):] for line in res.stdout.splitlines() if line.startswith(prefix)]
    assert [line.split()[0] for line in launched] == ["dump", "train"]
    assert "--batch-size 8 " in launched[1]  # 16 over 2 processes
    assert "top-1" in res.stdout


def test_the_global_batch_is_split_over_the_processes():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "recipes"))
    import _recipe

    args = list(_recipe.RESNET_SCHEDULE)
    assert _recipe.per_process_batch(args, 8)[args.index("--batch-size") + 1] == "32"
    assert _recipe.per_process_batch(args, 1) == args
    with pytest.raises(SystemExit, match="does not split"):
        _recipe.per_process_batch(args, 3)
