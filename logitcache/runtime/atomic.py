"""Atomic writes: a reader sees the old object or the new one, never half of one (markers, manifests, run files).

On a local disk: a temp file in the same directory, fsync'd, then `os.replace`. On an object store: a single
PUT, which object stores make atomic (a rename there would be copy + delete, no better).
"""

from __future__ import annotations

import os
import uuid


def write_atomic(path: str, data: bytes, fs=None) -> None:
    """Write ``data`` to ``path`` (a local path, or a path on fsspec filesystem ``fs``) atomically."""
    if fs is not None and not _is_local(fs):
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols
