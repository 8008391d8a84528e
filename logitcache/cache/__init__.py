"""The cache (stage 1's output, stage 2's input): a zarr v3 store of per-view top-k teacher logits and view
parameters, one (epoch, shard) unit at a time.

    schema.py   THE format: arrays, dtypes, codecs, chunking, metadata, unit markers (FORMAT.md in prose)
    store.py    opening a store safely (JSON only, checked array metadata, safe keys), object access, markers
                and unit indexes
    writer.py   CacheWriter: create/extend a group, write a unit, its marker last
    packs.py    the end of a dump: format 2 seals each epoch's units into packs + pack indexes (format 1: indexes)
    reader.py   CacheReader: read-only, opened lazily per process; THE stored rows -> TopKLogits conversion
    fidelity.py bytes/view, du and KL/gradient errors of a setting through the real writer/reader (bench, probe)
    verify.py   info, verify (checksums, completeness, sanity, data), recompute (views re-run by a teacher)
"""

from logitcache.cache.reader import CacheReader
from logitcache.cache.schema import GroupMeta, RootMeta, UnitMarker, UnitRows
from logitcache.cache.writer import CacheWriter

__all__ = ["CacheReader", "CacheWriter", "GroupMeta", "RootMeta", "UnitMarker", "UnitRows"]
