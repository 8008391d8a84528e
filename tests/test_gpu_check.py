"""pipelines/gpu_check.py, the GPU acceptance script, runs every step tiny on the CPU (--cpu-smoke), so it cannot
rot between the GPU runs (CI never depends on a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "pipelines" / "gpu_check.py"), "--cpu-smoke", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "CPU (smoke)"
    for prec in ("bf16", "fp32"):
        assert report["steps"][f"verify_{prec}"]["ok"] and report["steps"][f"verify_{prec}"]["views"] == 8
    assert set(report["ratios"]) == {"dump_bf16_over_bare_teacher", "dump_fp32_over_bare_teacher",
                                     "cached_nkd_over_ce", "online_kd_over_ce", "uskd_over_ce"}
    assert all(v > 0 for v in report["ratios"].values())
    assert "dump_bf16_over_bare_teacher" in res.stdout and "cached_nkd_over_ce" in res.stdout
