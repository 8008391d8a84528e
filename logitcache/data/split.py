"""Which shards a reader reads: ``--shards`` selections, and the exactly-once split over ranks x workers."""

from __future__ import annotations

import re
from collections.abc import Sequence

from logitcache.errors import (
    ShardSelectionError,
)


# ------------------------------------------------------------------ selections and the rank/worker split
def parse_shard_selection(text: str | None, num_shards: int | None = None) -> list[int]:
    """``"0-9"`` (inclusive), ``"0,3,5"``, ``"0-3,7"`` -> sorted unique shard indices.

    ``None``/``""``/``"all"`` means every shard (needs ``num_shards``). With ``num_shards``, indices past the
    last shard raise `ShardSelectionError`.
    """
    if text is None or text.strip() in ("", "all"):
        if num_shards is None:
            raise ShardSelectionError("selecting all shards needs the number of shards")
        return list(range(num_shards))
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ShardSelectionError(f"--shards {text!r}: {part!r} is not an index or a range like 0-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ShardSelectionError(f"--shards {text!r}: range {part.strip()!r} runs backwards")
        out.update(range(a, b + 1))
    if num_shards is not None and max(out) >= num_shards:
        raise ShardSelectionError(f"--shards {text!r}: shard {max(out)} does not exist "
                                  f"(the dataset has shards 0-{num_shards - 1})")
    return sorted(out)


def split_shards(shards: Sequence[int], rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[int]:
    """The shards one (rank, worker) reads: ``shards[rank::world_size][worker::num_workers]``.

    Every shard goes to exactly one (rank, worker). With fewer shards than ranks x workers, some readers get
    none; nothing is repeated or padded, so ranks may see different sample counts (a DDP loop must allow
    for that, e.g. with ``torch.distributed.algorithms.Join`` or by giving each rank whole shards).
    """
    return list(shards)[rank::world_size][worker::num_workers]


