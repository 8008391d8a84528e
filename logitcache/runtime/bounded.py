"""Bounded reads of metadata objects: THE place that reads a JSON object (or any small object) with a size cap.

Caches, manifests and run directories are shared artifacts that may be hostile: a 100 GB ``zarr.json`` must be
refused, naming it, before a byte of it is read into memory. `read_bounded` checks the object's size first where
that is free (a local ``stat``) and reads at most ``max_bytes + 1`` bytes in any case (one ranged GET on an object
store), so no object costs more than its cap, even one that grows between the check and the read.

The caps of the cache format's objects (``zarr.json``, markers, unit indexes, run records, manifests) live with
the format's other limits in `logitcache.cache.schema`; the caps below are those of objects outside a cache.
"""

from __future__ import annotations

import os

import fsspec

from logitcache.runtime.atomic import _is_local

#: a run directory's JSON files (``config.json``, ``val_reliability.json``) and the config / cache identity that
#: a checkpoint stores as JSON text: a few KiB each in practice (reliability: a few hundred bins)
MAX_RUN_JSON_BYTES = 16 << 20
#: ``metrics.jsonl``: one line of about 1 KiB per epoch; 256 MiB holds well over 100,000 epochs (the cache
#: format's own epoch limit), resumed epochs logged twice included
MAX_METRICS_LOG_BYTES = 256 << 20
#: a sample's ``.json`` member that a label is read from (``--label-key``): annotations of one image, KiBs
MAX_SAMPLE_JSON_BYTES = 16 << 20


def too_large(name: str, size: int | None, max_bytes: int, what: str) -> str:
    """The message for an object over its cap: names it, its size (or that it exceeds the cap) and the cap."""
    has = f"{size:,} bytes" if size is not None else f"over {max_bytes:,} bytes"
    return (f"{name} is {has}, more than the {max_bytes:,} bytes a {what} may have; refusing to read it "
            "(a damaged or hostile object?)")


def check_length(n: int, max_bytes: int, *, name: str, what: str, error: type[Exception]) -> None:
    """``error`` naming ``name`` when ``n`` (bytes already in hand) exceeds ``max_bytes``: parse nothing bigger."""
    if n > max_bytes:
        raise error(too_large(name, n, max_bytes, what))


def read_bounded(fs, path: str, max_bytes: int, *, name: str, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path`` on fsspec filesystem ``fs``, at most ``max_bytes`` of them: an object over the cap
    raises ``error`` (naming ``name``, its size and the cap) having read at most ``max_bytes + 1`` bytes; on a
    local disk its size is checked first and nothing is read. A missing object raises FileNotFoundError."""
    if _is_local(fs):
        with open(path, "rb") as f:  # one open: the size checked is the size of the file read
            size = os.fstat(f.fileno()).st_size
            check_length(size, max_bytes, name=name, what=what, error=error)
            data = f.read(size + 1)  # (a read of n bytes allocates n first: never read(max_bytes))
            while len(data) > size and len(data) <= max_bytes:  # it grew since: read on, in bounded steps
                more = f.read(min(max_bytes + 1 - len(data), 1 << 24))
                if not more:
                    break
                data += more
    else:
        try:  # one ranged GET (an object store answers the bytes it has, up to the range's end)
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            raise
        except Exception:
            # an empty object has no byte 0, and some stores answer such a range with an error: ask its size
            if fs.size(path) != 0:
                raise
            data = b""
    if len(data) > max_bytes:
        raise error(too_large(name, None, max_bytes, what))
    return data


def read_url_bounded(url: str, max_bytes: int, *, what: str, error: type[Exception]) -> bytes:
    """`read_bounded` of a local path or fsspec URL, named by ``url`` in the error."""
    fs, path = fsspec.core.url_to_fs(url)
    return read_bounded(fs, path, max_bytes, name=url, what=what, error=error)
