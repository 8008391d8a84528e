"""Edits of a dumped cache that tests make to reach a state on purpose (never used by the library)."""

from __future__ import annotations

from logitcache.cache import schema
from logitcache.cache.store import ObjectStore, read_unit_indexes


def unseal(url, group: str) -> None:
    """Turn a sealed group (format 2: units recorded only in their epochs' unit indexes) back into one with a
    marker object per unit and no index — the layout of format 1 and of caches dumped before sealing, so a test
    can edit or delete one unit's marker."""
    objects = ObjectStore(str(url))
    for (e, s), m in read_unit_indexes(objects, group).items():
        objects.put(schema.unit_marker_key(group, e, s), m.to_bytes())
    for key in objects.list(f"{group}/{schema.UNIT_INDEX_DIR}"):
        objects.delete(key)
