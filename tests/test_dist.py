"""The runtime's distributed choices (issue 14): the device each rank computes on, its group's backend, and the
device every collective's tensors live on.

There is no GPU here: the NCCL choices are checked with torch.distributed / torch.cuda stubbed (an 8-GPU torchrun
rank's view), and the real collectives run in a 2-process gloo group where tests/_collective_check.py checks every
call against what the runtime says the backend needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from logitcache.runtime import dist

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---------------------------------------------------------------- the choices
def test_backend_and_devices():
    assert dist.backend_for("cuda") == "nccl" and dist.backend_for("cuda:3") == "nccl"
    assert dist.backend_for("cpu") == "gloo"
    assert dist.process_device("cuda", world=8, local=5) == "cuda:5"  # one GPU per rank
    assert dist.process_device("cuda:2", world=8, local=5) == "cuda:2"  # explicit: as given
    assert dist.process_device("cpu", world=8, local=5) == "cpu"
    assert dist.collective_device("nccl", "cuda:5") == "cuda:5"
    assert dist.collective_device("gloo", "cuda:5") == "cpu"  # gloo needs CPU tensors even when computing on a GPU
    assert dist.collective_device(None, "cuda:5") == "cpu"


class FakeTorchrunRank:
    """torch.distributed and torch.cuda as rank 13 of 16 (2 machines x 8 GPUs, LOCAL_RANK 5) sees them, with every
    request recorded. Tensors 'on cuda:5' cannot exist without a GPU: `torch.tensor` records the device asked
    for and builds the tensor on the CPU."""

    def __init__(self, monkeypatch):
        for k, v in {"WORLD_SIZE": "16", "RANK": "13", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}.items():
            monkeypatch.setenv(k, v)
        self.backend, self.calls, self.tensor_devices = None, [], []
        d = torch.distributed
        monkeypatch.setattr(d, "is_initialized", lambda: self.backend is not None)
        monkeypatch.setattr(d, "init_process_group", self._init)
        monkeypatch.setattr(d, "get_rank", lambda group=None: 13)
        monkeypatch.setattr(d, "get_world_size", lambda group=None: 16)
        monkeypatch.setattr(d, "get_backend", lambda group=None: self.backend)
        monkeypatch.setattr(torch.cuda, "set_device", lambda dev: self.calls.append(("set_device", str(dev))))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
        for name in ("all_reduce", "broadcast"):
            monkeypatch.setattr(d, name, lambda t, *a, _n=name, **k: self.calls.append((_n, str(t.device))))
        monkeypatch.setattr(d, "all_gather", lambda out, t, *a, **k: self.calls.append(("all_gather", str(t.device))))
        monkeypatch.setattr(d, "barrier", lambda *a, **k: self.calls.append(("barrier", k.get("device_ids"))))
        real = torch.tensor

        def tensor(data, *, dtype=None, device=None):
            self.tensor_devices.append(None if device is None else str(device))
            return real(data, dtype=dtype)

        monkeypatch.setattr(torch, "tensor", tensor)

    def _init(self, backend, **kwargs):
        self.calls.append(("init", backend, str(kwargs.get("device_id"))))
        self.backend = backend


def test_cuda_under_torchrun_is_nccl_on_cuda_local_rank(monkeypatch):
    fake = FakeTorchrunRank(monkeypatch)
    env = dist.init_distributed("cuda")
    assert (env.rank, env.world, env.local_rank, env.device, env.backend) == (13, 16, 5, "cuda:5", "nccl")
    assert env.collective_device == "cuda:5"
    # bound to its GPU before the group exists, and the group told which GPU is this rank's
    assert fake.calls[:2] == [("set_device", "cuda:5"), ("init", "nccl", "cuda:5")]
    env.all_sum([1.0, 2.0])
    env.all_gather_floats(3.0)
    assert fake.tensor_devices == ["cuda:5", "cuda:5"]  # every collective tensor made on this rank's GPU
    env.barrier()
    assert fake.calls[-1] == ("barrier", [5])
    assert dist.group_collective_device() == "cuda:5"  # what ClassificationMetrics.gather uses
    assert dist.current_env("cuda").device == "cuda:5"  # evaluation inside the run: the same GPU


def test_a_gpu_dump_computes_on_cuda_local_rank_and_meets_over_gloo(monkeypatch):
    """`dump --device cuda` under torchrun: each rank's teacher on cuda:LOCAL_RANK (not every rank on cuda:0);
    its barriers over gloo (CPU), which waits as long as the slowest rank needs."""
    fake = FakeTorchrunRank(monkeypatch)
    env = dist.init_distributed("cuda", backend="gloo")
    assert env.device == "cuda:5" and env.backend == "gloo" and env.collective_device == "cpu"
    assert ("set_device", "cuda:5") in fake.calls and ("init", "gloo", "None") in fake.calls
    env.broadcast_(torch.zeros(2))
    assert fake.calls[-1] == ("broadcast", "cpu")
    env.barrier()
    assert fake.calls[-1] == ("barrier", None)


def test_cpu_under_torchrun_is_gloo_on_the_cpu(monkeypatch):
    fake = FakeTorchrunRank(monkeypatch)
    env = dist.init_distributed("cpu")
    assert (env.backend, env.device, env.collective_device) == ("gloo", "cpu", "cpu")
    env.all_sum([1.0])
    assert fake.tensor_devices == ["cpu"] and ("all_reduce", "cpu") in fake.calls
    assert not any(c[0] == "set_device" for c in fake.calls)


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    env = dist.init_distributed("cpu")
    assert (env.rank, env.world, env.backend) == (0, 1, None)
    assert env.all_sum([2.0, 3.0]) == [2.0, 3.0] and env.all_gather_floats(1.5) == [1.5]
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("cores", "processes", "workers"),
                         [(2, 1, 1), (2, 2, 0), (16, 8, 1), (24, 4, 5), (40, 4, 8), (128, 8, 8), (1, 1, 0)])
def test_default_workers_from_the_cores_per_process(cores, processes, workers):
    assert dist.default_workers(cores, processes) == workers


def test_default_workers_reads_the_affinity_mask_and_local_world_size(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.usable_cores() == 24 and dist.default_workers() == 5


# ---------------------------------------------------------------- real collectives: 2 gloo processes
def _checked_torchrun(out: Path, args: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "_collective_check.py"), str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [json.loads((out / f"collectives-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_every_collective_of_a_two_process_dump_and_train_gets_the_backends_device(imagenet_shards, tmp_path):
    """A 2-rank gloo dump, then a 2-rank cached-NKD train with validation and a checkpoint: every collective
    (lockstep all-reduce, weights all-gather, buffer broadcast, metrics all-gather, checkpoint gather, barriers)
    receives its tensors on the device the runtime says gloo needs, and each kind was called."""
    cache = tmp_path / "cache.zarr"
    dump_calls = _checked_torchrun(tmp_path / "dump", [
        "dump", "--teacher", "smallcnn", "--data", str(imagenet_shards), "--out", str(cache), "--recipe", "imagenet",
        "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--json"])
    train_calls = _checked_torchrun(tmp_path / "train", [
        "train", "--data", str(imagenet_shards), "--val", str(imagenet_shards), "--out", str(tmp_path / "run"),
        "--student", "smallcnn", "--loss", "nkd", "--cache", str(cache), "--epochs", "1", "--batch-size", "4",
        "--workers", "0", "--no-progress"])
    for rank in dump_calls + train_calls:
        assert rank["violations"] == []
    assert all(r["calls"].get("barrier", 0) >= 3 for r in dump_calls)
    for r in train_calls:
        for kind in ("all_reduce", "all_gather", "broadcast", "all_gather_object", "barrier"):
            assert r["calls"].get(kind, 0) > 0, (kind, r["calls"])


def test_the_collective_checker_catches_a_tensor_on_the_wrong_device(tmp_path, monkeypatch):
    """The check above can fail: under a (stubbed) NCCL group a CPU tensor is a violation."""
    sys.path.insert(0, str(REPO / "tests"))
    import _collective_check as cc

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cc, "violations", [])
    cc._wrap("all_reduce", lambda t: None)(torch.zeros(1))
    assert cc.violations and cc.violations[0]["runtime_says"] == "cuda:0" and cc.violations[0]["device"] == "cpu"
