"""Edits of a dumped cache that tests make to reach a state on purpose (never used by the library)."""

from __future__ import annotations

import os

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ObjectStore, read_unit_indexes


def unseal(url, group: str) -> None:
    """Turn a sealed group (format 2: units recorded only in their epochs' unit indexes, their chunks in packs)
    back into one with a marker object and a chunk object per unit and no index or pack — the layout of format 1
    and of caches dumped before sealing, so a test can edit or delete one unit's marker or chunk."""
    objects = ObjectStore(str(url))
    meta = CacheReader(str(url), group).meta
    for (e, s), m in read_unit_indexes(objects, group).items():
        if m.pack is not None:
            p = m.pack
            data = objects.get_range(schema.pack_key(group, e, p.pack_id), p.offset, p.length)
            objects.put(schema.unit_chunk_keys(group, meta, e, s)[schema.ROWS], data)
        objects.put(schema.unit_marker_key(group, e, s), m.unpacked().to_bytes())
    for folder in (schema.UNIT_INDEX_DIR, schema.PACKS_DIR):
        for key in objects.list(f"{group}/{folder}"):
            objects.delete(key)


def unit_span(url, group: str, epoch: int, shard: int) -> tuple[str, int, int]:
    """(file, offset, length) of the stored bytes of unit (epoch, shard) of a local cache: its range of a pack
    when it is sealed, else its whole chunk file."""
    reader = CacheReader(str(url), group)
    m = reader.unit_marker(epoch, shard, fresh=True)
    path = os.path.join(str(url), schema.rows_object_key(group, reader.meta, epoch, shard, m))
    return (path, m.pack.offset, m.pack.length) if m.pack is not None else (path, 0, os.path.getsize(path))


def flip_unit_byte(url, group: str, epoch: int, shard: int, *, at: float = 0.5, bit: int = 0x10) -> str:
    """Flip one bit of unit (epoch, shard)'s stored bytes, wherever they lie; returns the file edited."""
    path, offset, length = unit_span(url, group, epoch, shard)
    with open(path, "r+b") as f:
        f.seek(offset + int(length * at))
        b = f.read(1)
        f.seek(offset + int(length * at))
        f.write(bytes([b[0] ^ bit]))
    return path
