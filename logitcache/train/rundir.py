"""The run directory: ``config.json``, ``metrics.jsonl`` (one line per epoch), ``val_reliability.json`` and
``checkpoints/`` — local paths, every file written atomically."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch

from logitcache.errors import RunError
from logitcache.runtime.atomic import write_atomic
from logitcache.runtime.bounded import MAX_METRICS_LOG_BYTES, MAX_RUN_JSON_BYTES, read_url_bounded


# ------------------------------------------------------------------ the run directory
class RunDir:
    """RUN/config.json, RUN/metrics.jsonl, RUN/val_reliability.json, RUN/checkpoints/ (local paths)."""

    def __init__(self, out: str):
        if "://" in out and not out.startswith("file://"):
            raise ValueError(f"--out {out!r}: run directories are local paths (checkpoints are written atomically "
                             f"with a rename); copy the run to object storage afterwards")
        self.path = out[len("file://"):] if out.startswith("file://") else out
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.last = os.path.join(self.checkpoints, "last.pt")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(self.file(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_atomic(name, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, name: str) -> Any:
        return json.loads(read_url_bounded(self.file(name), MAX_RUN_JSON_BYTES, what="run file", error=RunError))

    def metrics(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.file("metrics.jsonl")):
            return []
        text = read_url_bounded(self.file("metrics.jsonl"), MAX_METRICS_LOG_BYTES, what="metrics log", error=RunError)
        return [json.loads(line) for line in text.decode("utf-8").split("\n") if line.strip()]

    def keep_metrics_before(self, epoch: int) -> None:
        """Drop metrics lines of epochs a resumed run will redo (written after the checkpoint it resumes)."""
        lines = [m for m in self.metrics() if m["epoch"] < epoch]
        self.write_atomic("metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines).encode())

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, state: dict[str, Any], *names: str) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        for name in names:
            self.write_atomic(os.path.join("checkpoints", name), buffer.getvalue())


