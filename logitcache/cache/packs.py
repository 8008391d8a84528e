"""Sealing format 2's units into packs: what a local disk allocates for a cache stays close to its size.

A local filesystem gives every file whole 4 KiB blocks, so a cache of small units (the Fashion-MNIST demo's are
~9 kB: 12 KiB allocated) is billed up to 1.4x its bytes, and every unit is an object to list, copy and sync. So
the process that ends a dump (`dump`'s rank 0 after its final barrier) **seals** each epoch that has units
finished since the last seal: it concatenates the chunk bytes of every finished unit of the epoch, in shard
order, into packs of at most `schema.PACK_MAX_BYTES` (``<group>/packs/e<EEEEE>-<id>.bin``, id = the pack's
content hash), writes one unit index per pack listing where each unit lies (``unit_index/e<EEEEE>-<id>.json``,
read back and made durable), and only then deletes what the packs supersede: the epoch's older indexes and
packs, its marker objects, and its standalone chunks. FORMAT.md "Sealed units" is the contract.

Why it stays safe:
- every object is written once with its final bytes (a pack and its index are named by the pack's content: two
  sealers packing the same units write identical objects), and nothing is deleted before the indexes that
  supersede it are durable; a crash in between leaves duplicates (same records, readers take either) or
  garbage, never a unit without a record;
- a unit's bytes are checked against the sha256 of its record before they are packed; an epoch with a unit
  that cannot be read or does not match is left as it is (and named), for `verify` and `dump --repair`;
- a sealer deletes only objects it listed and read, so two dumps sealing at once (two hosts) can each leave a
  copy of a unit, never lose one.
The same units sealed give the same objects: the cache's bytes do not depend on the rank count or on resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from logitcache.cache import schema
from logitcache.cache.schema import GroupMeta, PackRef, UnitMarker
from logitcache.cache.store import (
    UNIT_INDEX,
    ObjectStore,
    UnitIndex,
    merge_indexes,
    put_index,
    read_index_objects,
    read_marker_objects,
    sha256_hex,
    write_unit_indexes,
)


@dataclass
class SealReport:
    """What `seal_units` did: the epochs sealed, and those left unsealed with why."""

    sealed: list[int]
    left: dict[int, str]


class _LeaveEpoch(Exception):
    """An epoch cannot be sealed now (a unit's bytes missing or not matching its record): it is left as is."""


def finish_units(objects: ObjectStore, group: str, meta: GroupMeta) -> SealReport:
    """What the process ending a dump does once every unit it waited for is finished: format 2 seals the units
    (`seal_units`); format 1 writes its epochs' unpacked unit indexes, its markers staying the truth."""
    if meta.packed:
        return seal_units(objects, group, meta)
    return SealReport(write_unit_indexes(objects, group), {})


def seal_units(objects: ObjectStore, group: str, meta: GroupMeta) -> SealReport:
    """Seal every epoch of a format-2 group that has marker objects or a unit that two indexes list (left by a
    seal that stopped before its deletions, or by two seals of different units at once): module docstring. Run
    by the process that ends a dump, once the units it waited for are finished."""
    markers = read_marker_objects(objects, group)  # listed before the indexes, as `store.read_markers` does
    indexes_of: dict[int, list[UnitIndex]] = {}
    for ix in read_index_objects(objects, group):  # read once: a sealer deletes only what it read here
        indexes_of.setdefault(ix.epoch, []).append(ix)
    report = SealReport([], {})
    for epoch in sorted({e for e, _ in markers} | _epochs_recorded_twice(indexes_of)):
        indexes = indexes_of.get(epoch, [])
        own = {s: m for (e, s), m in markers.items() if e == epoch}
        records = {**{s: m for (_, s), m in merge_indexes(indexes, objects.url).items()}, **own}
        try:
            written = _seal_epoch(objects, group, meta, epoch, records)
        except _LeaveEpoch as why:  # nothing deleted: the epoch keeps its markers, chunks and older packs
            report.left[epoch] = str(why)
            continue
        # the new indexes are durable: what they supersede goes, records before the bytes they point to
        objects.delete_many([ix.key for ix in indexes if ix.key not in written])
        objects.delete_many([schema.pack_key(group, epoch, ix.pack_id) for ix in indexes
                             if ix.pack_id is not None and ix.key not in written])
        objects.delete_many([schema.unit_marker_key(group, epoch, s) for s in own])
        objects.delete_many([schema.unit_chunk_keys(group, meta, epoch, s)[schema.ROWS] for s in records])
        report.sealed.append(epoch)
    if objects.is_local:  # an empty folder still takes a block; the next marker written makes it again
        try:
            os.rmdir(objects.path(f"{group}/{schema.UNITS_DIR}"))
        except OSError:
            pass  # not empty (units finished by another process since, or left unsealed) or already gone
    return report


def _epochs_recorded_twice(indexes_of: dict[int, list[UnitIndex]]) -> set[int]:
    """Epochs where some unit is listed by more than one unit index: sealing them again leaves one record each
    and deletes the superseded packs (an epoch of several packs, each listing its own units, is not one)."""
    return {e for e, indexes in indexes_of.items()
            if sum(len(ix.entries) for ix in indexes) > len({s for ix in indexes for s in ix.entries})}


def _seal_epoch(objects: ObjectStore, group: str, meta: GroupMeta, epoch: int,
                records: dict[int, UnitMarker]) -> set[str]:
    """Write the epoch's packs (its units in shard order, at most `schema.PACK_MAX_BYTES` each, one in memory at a
    time) and their indexes; returns the index keys written."""
    written, batch, size = set(), [], 0
    for s, data in _unit_bytes(objects, group, meta, epoch, records):
        if batch and size + len(data) > schema.PACK_MAX_BYTES:
            written.add(_write_pack(objects, group, epoch, records, batch))
            batch, size = [], 0
        batch.append((s, data))
        size += len(data)
    if batch:
        written.add(_write_pack(objects, group, epoch, records, batch))
    return written


#: standalone chunks fetched per request batch while sealing (s3fs runs each batch's GETs concurrently)
_FETCH_BATCH = 256


def _unit_bytes(objects: ObjectStore, group: str, meta: GroupMeta, epoch: int, records: dict[int, UnitMarker]):
    """(shard, stored chunk bytes) of each unit in shard order, from its standalone chunk or its range of a pack
    (the pack read once up to its last unit's end while consecutive units lie in it), each checked against its
    record's sha256 (`_LeaveEpoch` otherwise)."""
    shards = sorted(records)
    ends: dict[str, int] = {}
    for m in records.values():
        if m.pack is not None:
            ends[m.pack.pack_id] = max(ends.get(m.pack.pack_id, 0), m.pack.offset + m.pack.length)
    got: dict[str, bytes] = {}
    pack, pack_bytes = None, None
    for i, s in enumerate(shards):
        m = records[s]
        key = schema.rows_object_key(group, meta, epoch, s, m)
        if m.pack is None:
            if key not in got:
                got = objects.get_many([schema.rows_object_key(group, meta, epoch, t, records[t])
                                        for t in shards[i:i + _FETCH_BATCH] if records[t].pack is None])
            where, data = key, got.get(key)
        else:
            if pack != key:
                pack, pack_bytes = key, objects.get_range(key, 0, ends[m.pack.pack_id])
            where = f"{key} at {m.pack.offset}"
            data = None if pack_bytes is None else pack_bytes[m.pack.offset:m.pack.offset + m.pack.length]
        if data is None or sha256_hex(data) != m.chunks[schema.ROWS]:
            raise _LeaveEpoch(f"unit (epoch {epoch}, shard {s}): {where} is "
                              f"{'missing' if data is None else 'not the bytes its record hashed'}")
        yield s, data


def _write_pack(objects: ObjectStore, group: str, epoch: int, records: dict[int, UnitMarker],
                batch: list[tuple[int, bytes]]) -> str:
    """One pack of ``batch``'s (shard, chunk bytes), durable, then its unit index; returns the index's key."""
    data = b"".join(chunk for _, chunk in batch)
    pack_id = schema.pack_id_of(data)
    entries, offset = [], 0
    for s, chunk in batch:
        entries.append(replace(records[s].unpacked(), pack=PackRef(pack_id, offset, len(chunk))))
        offset += len(chunk)
    index = schema.unit_index_bytes(epoch, entries)
    if len(index) > UNIT_INDEX["max_bytes"]:  # cannot happen within the limits; never write what readers refuse
        raise _LeaveEpoch(f"its unit index would exceed {UNIT_INDEX['max_bytes']} bytes")
    key = schema.pack_key(group, epoch, pack_id)
    objects.put(key, data)
    objects.fsync([key])  # the pack is durable before the index that points into it
    index_key = schema.unit_index_key(group, epoch, pack_id)
    put_index(objects, index_key, epoch, pack_id, index, entries)
    return index_key
