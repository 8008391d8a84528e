"""Counting host–device synchronisations in the training step: the profile behind bench_train.py's "syncs per
step" and the tests that keep it at 0.

The loop says where it is with `mark`: ``"step"`` (the hot path: forward, loss, backward, optimizer step,
running sums), ``"data"`` (waiting for the DataLoader), ``"display"`` (the progress display, the finite-loss
check and checkpoints, every N steps). A `SyncCounter` patches every Python entry point that makes the host
wait for the device — reading values (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ``cpu()``,
``numpy()``, formatting), ops whose output size depends on the data (``nonzero``, ``unique``,
``masked_select``; not boolean-mask indexing, see below), copies the host waits for (``to(device)`` without
``non_blocking=True`` — counted even where it is a no-op, since the same call copies from the host on a GPU
run — and any copy of a device tensor to the host), ``torch.cuda.synchronize`` and event or
stream waits, and the ``torch.distributed`` collectives — and counts the calls the training thread makes in
each phase. A call counts whatever the device, so a CPU run shows the syncs a GPU run would make. Calls made
inside a counted call (``float()`` calling ``item()``) count once. Without a counter, `mark` costs a list
assignment. Collectives are seen when called as ``torch.distributed.X`` (or through ``distributed_c10d``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import torch

_PHASE: list[str] = []
_ACTIVE: SyncCounter | None = None

#: not ``__getitem__`` (boolean-mask indexing): patching it even once turns Tensor into a Python "sequence" for
#: good (CPython fills the sq_item slot), which breaks ``torch.tensor([t0, t1])`` on 0-d tensors afterwards
_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__",
                   "__format__", "__repr__", "nonzero", "unique", "masked_select", "to")
_TORCH_FUNCTIONS = ("nonzero", "argwhere", "unique", "masked_select")
_DIST_FUNCTIONS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                   "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
                   "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
                   "all_to_all", "all_to_all_single", "send", "recv")


def mark(name: str | None) -> None:
    """The training thread now does ``name`` (``"step"``, ``"data"``, ``"display"``; None: none of them).
    Each ``mark("step")`` counts one step."""
    _PHASE[:] = [name] if name is not None else []
    if name == "step" and _ACTIVE is not None:
        _ACTIVE.steps += 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``name`` inside the block, the mark before it afterwards."""
    _PHASE.append(name)
    try:
        yield
    finally:
        _PHASE.pop()


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "__getitem__":  # x[mask] with a boolean tensor: the output's size needs the mask's count
        idx = args[1] if len(args) > 1 else None
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (idx if isinstance(idx, tuple) else (idx,)))
    if name == "to":  # a device copy the host waits for: blocking, or a device tensor copied to the host
        dest = kwargs.get("device", args[1] if len(args) > 1 else None)
        if isinstance(dest, str):
            try:
                dest = torch.device(dest)
            except RuntimeError:
                return False
        if not isinstance(dest, torch.device):
            return False  # a dtype or memory-format change
        to_host = dest.type == "cpu" and args[0].device.type != "cpu"
        return to_host or not kwargs.get("non_blocking", args[2] if len(args) > 2 and isinstance(args[2], bool)
                                         else False)
    return True


class SyncCounter:
    """``with SyncCounter() as syncs: train(...)``: ``syncs.counts`` holds the calls made in the hot path
    (phase ``"step"``) by name, ``syncs.total`` their number, ``syncs.other`` those made while displaying or
    checkpointing (``"display:Tensor.item"``...), ``syncs.steps`` the steps seen. Only the thread that entered
    the counter is counted (a background writer is off the hot path by design)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.other: Counter[str] = Counter()
        self.steps = 0
        self._patches: list[tuple[object, str, object]] = []
        self._thread = threading.get_ident()
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        counter = self

        def counted(*args, **kwargs):
            if _ACTIVE is not counter or threading.get_ident() != counter._thread or not _PHASE:
                return original(*args, **kwargs)
            if counter._depth == 0 and _PHASE[-1] != "data" and _syncs(attr, args, kwargs):
                if _PHASE[-1] == "step":
                    counter.counts[label] += 1
                else:
                    counter.other[f"{_PHASE[-1]}:{label}"] += 1
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        # whether the class defines it itself: restoring an inherited dunder by setattr would change the type's
        # slots (a Tensor with its own __getitem__ becomes a "sequence" to torch.tensor), so it is deleted instead
        self._patches.append((owner, attr, original if attr in vars(owner) else None))
        setattr(owner, attr, counted)

    def __enter__(self) -> SyncCounter:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a SyncCounter is already counting")
        self._thread = threading.get_ident()
        for name in _TENSOR_METHODS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in _TORCH_FUNCTIONS:
            self._wrap(torch, name, f"torch.{name}")
        self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
        self._wrap(torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")
        self._wrap(torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize")
        if torch.distributed.is_available():
            from torch.distributed import distributed_c10d

            for name in _DIST_FUNCTIONS:
                for owner in (torch.distributed, distributed_c10d):
                    if hasattr(owner, name):
                        self._wrap(owner, name, f"torch.distributed.{name}")
        _PHASE.clear()
        _ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None
        _PHASE.clear()
        for owner, attr, original in reversed(self._patches):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._patches.clear()


__all__ = ["SyncCounter", "mark", "phase"]
