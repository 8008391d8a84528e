"""Run the logitcache CLI with every torch.distributed collective checked (tests/test_dist.py, under torchrun):

    python -m torch.distributed.run --nproc-per-node 2 tests/_collective_check.py OUT_DIR train ...

Each collective's tensor arguments are compared with the device the runtime says the group's backend needs
(`logitcache.runtime.dist.group_collective_device`), and with what the backend itself accepts, independently of
the runtime (gloo: CPU tensors; NCCL: CUDA tensors). Every call is recorded in OUT_DIR/collectives-rank<R>.json
as ``{"calls": {name: count}, "violations": [...]}``; the exit status is the CLI's.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "gather", "scatter",
           "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "send", "recv", "barrier", "all_gather_object",
           "broadcast_object_list", "gather_object", "scatter_object_list")
calls: dict[str, int] = {}
violations: list[dict] = []


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _wrap(name, fn):
    def checked(*args, **kwargs):
        from logitcache.runtime.dist import group_collective_device

        calls[name] = calls.get(name, 0) + 1
        backend = dist.get_backend()
        runtime_says = torch.device(group_collective_device())
        for t in (*_tensors(args), *_tensors(list(kwargs.values()))):
            backend_accepts = t.device.type == ("cuda" if backend == "nccl" else "cpu")
            if t.device != runtime_says or not backend_accepts:
                violations.append({"call": name, "device": str(t.device), "runtime_says": str(runtime_says),
                                   "backend": backend, "shape": list(t.shape)})
        return fn(*args, **kwargs)

    return checked


def main() -> int:
    out = sys.argv[1]
    for name in CHECKED:
        if hasattr(dist, name):
            setattr(dist, name, _wrap(name, getattr(dist, name)))
    from logitcache.cli import main as cli

    code: int | str | None = 0
    try:
        cli.main(args=sys.argv[2:], prog_name="logitcache")
    except SystemExit as e:
        code = e.code
    finally:
        with open(os.path.join(out, f"collectives-rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"calls": calls, "violations": violations}, f)
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
