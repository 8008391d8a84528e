"""The one place that knows this process's place in a run: rank, world size, local rank, device and the
process group's backend, plus the collectives the rest of the code uses.

Under torchrun (``WORLD_SIZE`` > 1) `init_distributed` joins the process group: NCCL when the device is a GPU,
gloo otherwise (or the backend asked for: the dump's ranks only meet at barriers, over gloo). ``--device cuda``
means one GPU per rank, ``cuda:LOCAL_RANK`` (`process_device`), for every command. Collectives go through
`DistEnv` so their tensors are always on the device the backend needs (`collective_device`: NCCL -> the rank's
GPU, gloo -> the CPU; NCCL rejects CPU tensors, gloo accepts both, which is why a gloo-only run cannot catch that
mistake: tests/test_dist.py checks the choices with NCCL stubbed and every real collective of a 2-process gloo
run against what this module says).

`default_workers`: the ``--workers`` default, derived from the cores this process may use.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)``: explicit values, else torchrun's RANK/WORLD_SIZE, else an
    initialised torch.distributed group, else ``(0, 1)``."""
    if world_size is None:
        if "WORLD_SIZE" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = 1
    if rank is None:
        if "RANK" in os.environ:
            rank = int(os.environ["RANK"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size} is not a valid split")
    return rank, world_size


def local_rank() -> int:
    """torchrun's LOCAL_RANK (the GPU index on this node), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def backend_for(device: str) -> str:
    """The process-group backend for a device: NCCL for GPUs, gloo for CPUs."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def process_device(device: str, world: int, local: int) -> str:
    """The device this process computes on: a bare ``cuda`` means one GPU per rank, ``cuda:LOCAL_RANK``."""
    if str(device) == "cuda" and world > 1:
        return f"cuda:{local}"
    return str(device)


def collective_device(backend: str | None, device: str) -> str:
    """Where a collective's tensors must live: on the process's GPU for NCCL (``cuda:LOCAL_RANK`` when the
    process computes on the CPU but joined an NCCL group), on the CPU otherwise."""
    if backend == "nccl":
        return device if str(device).startswith("cuda") else f"cuda:{local_rank()}"
    return "cpu"


def group_collective_device(group=None) -> str:
    """`collective_device` of the initialised process group (the CPU when there is none), for code that is handed
    a group rather than a `DistEnv` (`ClassificationMetrics.gather`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "cpu"
    backend = torch.distributed.get_backend(group)
    return collective_device(backend, f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")


@dataclass(frozen=True)
class DistEnv:
    """This process in a run: ``rank`` of ``world``, ``local_rank``, its ``device`` and the group's ``backend``
    (None outside a process group). ``owns_group``: `init_distributed` created the group (and `close` ends it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> str:
        return collective_device(self.backend, self.device)

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.backend == "nccl":  # on this rank's GPU (NCCL would otherwise guess one)
            torch.distributed.barrier(device_ids=[torch.device(self.collective_device).index])
        else:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a short list of numbers (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather_floats(self, value: float) -> list[float]:
        """One number from every rank, in rank order."""
        if self.world == 1:
            return [float(value)]
        t = torch.tensor([value], dtype=torch.float64, device=self.collective_device)
        gathered = [torch.zeros_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, t)
        return [float(g) for g in gathered]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast ``tensor`` in place from ``src`` (moved through the collective device if it lives elsewhere)."""
        if self.world == 1:
            return
        if tensor.device == torch.device(self.collective_device):
            torch.distributed.broadcast(tensor, src)
            return
        staged = tensor.to(self.collective_device)
        torch.distributed.broadcast(staged, src)
        tensor.copy_(staged)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


#: how long a rank waits at a collective for the others (a dump's ranks wait at its last barrier for the rank
#: with the most units left; torch's defaults are 10 min for NCCL and 30 for gloo)
TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device: str = "cpu", *, backend: str | None = None) -> DistEnv:
    """This process's `DistEnv`; under torchrun, bind the process to ``cuda:LOCAL_RANK`` (for ``cuda``) and join
    (or create) the process group with ``backend`` (default: the device's, `backend_for`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = local_rank()
    if world <= 1:
        return DistEnv(device=str(device))
    device = process_device(device, world, local)
    if device.startswith("cuda"):  # before the group exists, so NCCL binds to this GPU
        torch.cuda.set_device(device)
    owns = False
    if not torch.distributed.is_initialized():
        backend = backend or backend_for(device)
        extra = {"device_id": torch.device(device)} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, timeout=TIMEOUT, **extra)
        owns = True
    backend = torch.distributed.get_backend()
    return DistEnv(torch.distributed.get_rank(), world, local, device, backend, owns)


def current_env(device: str = "cpu") -> DistEnv:
    """The `DistEnv` of an already initialised process group (e.g. evaluation inside training), else a single
    process. Never creates a group: without one, per-rank results could not be merged."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return DistEnv(torch.distributed.get_rank(), world, local_rank(), process_device(device, world, local_rank()),
                       torch.distributed.get_backend())
    return DistEnv(device=str(device))


#: the environment of a plain, single process (a safe default: `DistEnv` is immutable)
SINGLE_PROCESS = DistEnv()


#: batches each DataLoader worker keeps ready (torch's default is 2; JPEG decoding is bursty)
PREFETCH_BATCHES = 4


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (a container's or a batch job's share), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cores: int | None = None, processes: int | None = None) -> int:
    """The ``--workers`` default: ``min(8, cores // processes on this machine - 1)``, at least 0. One core per
    process stays with the main process (the model step, the teacher, the writer); the rest decode. 8 keep a GPU
    fed on ImageNet-sized JPEGs with the imagenet recipe; more cost memory for nothing. Defaults: `usable_cores`
    and torchrun's LOCAL_WORLD_SIZE (e.g. 96 cores, 8 ranks -> 8 workers per rank; 2 cores, 1 process -> 1)."""
    cores = usable_cores() if cores is None else cores
    processes = local_world_size() if processes is None else processes
    return max(0, min(8, cores // max(processes, 1) - 1))
