"""Format 2's packs (FORMAT.md "Sealed units"): a finished dump's epoch is one pack of its units' chunks and one
pack index; reads, verify and repair work per unit inside it; the same units give the same objects; a crash, a
second sealer, a reader that read records before the seal, or a hostile pack entry lose nothing and read nothing
they should not."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from _cache_edit import flip_unit_byte, unit_span, unseal
from click.testing import CliRunner

from logitcache.cache import schema
from logitcache.cache.packs import seal_units
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ObjectStore
from logitcache.cache.verify import cache_info, verify_cache
from logitcache.cli import main
from logitcache.dump import DumpConfig, dump
from logitcache.errors import CacheError, CacheMetadataError, DamagedUnitError

CFG = dict(teacher="smallcnn", recipe="small", epochs=2, topk=3, seed=0, batch_size=8, progress=False)
GROUP = "smallcnn"
UNITS = [(e, s) for e in range(2) for s in range(2)]


def _dump(data, out, **kw):
    return dump(DumpConfig(data=str(data), out=str(out), **{**CFG, **kw}))


def unit_files(url) -> dict[str, bytes]:
    """Every object that holds or records units (packs, indexes, markers, chunk objects), by path."""
    base, out = os.path.join(str(url), GROUP), {}
    for folder in (schema.PACKS_DIR, schema.UNIT_INDEX_DIR, schema.UNITS_DIR, schema.ROWS):
        for name in sorted(os.listdir(os.path.join(base, folder))) if os.path.isdir(os.path.join(base, folder)) \
                else []:
            if name != "zarr.json":
                with open(os.path.join(base, folder, name), "rb") as f:
                    out[f"{folder}/{name}"] = f.read()
    return out


def copy(src, tmp_path, name="c.zarr"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def packed(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "cache.zarr"
    _dump(small_shards, out)
    return out


def test_a_sealed_epoch_is_one_pack_and_reads_as_its_chunks_did(packed, tmp_path):
    files = unit_files(packed)
    packs = sorted(k for k in files if k.startswith(schema.PACKS_DIR))
    assert [p.split("/")[1][:7] for p in packs] == ["e00000-", "e00001-"]
    # one pack and one pack index per epoch, named by the pack's content; no marker, no chunk object left
    assert sorted(files) == sorted(packs + [f"{schema.UNIT_INDEX_DIR}/{p.split('/')[1][:-4]}.json" for p in packs])
    assert all(p.split("/")[1][7:-4] == schema.pack_id_of(files[p]) for p in packs)
    assert cache_info(str(packed))["groups"][GROUP]["objects_per_unit"] == 0.5  # 2 packs for 4 units

    loose = copy(packed, tmp_path)
    unseal(loose, GROUP)  # the same units as chunk objects with markers (what a dump writes before it seals)
    assert sum(k.startswith(f"{schema.ROWS}/c.") for k in unit_files(loose)) == 4
    a, b = CacheReader(str(packed)), CacheReader(str(loose))
    for e, s in UNITS:
        ma, mb = a.unit_marker(e, s), b.unit_marker(e, s)
        assert ma.pack is not None and mb.pack is None and ma.unpacked() == mb
        ua, ub = a.read_unit(e, s), b.read_unit(e, s)
        assert ua.fields.keys() == ub.fields.keys()
        for name in ua.fields:
            np.testing.assert_array_equal(ua.fields[name], ub.fields[name])
    # a pack is the chunks back to back: each unit's range is exactly its former chunk object
    for e, s in UNITS:
        path, offset, length = unit_span(packed, GROUP, e, s)
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(length) == unit_files(loose)[f"{schema.ROWS}/c.{e}.{s}.0.0"]
    assert verify_cache(str(packed)).ok


def test_the_same_units_give_the_same_objects(small_shards, packed, tmp_path):
    """Two `dump --shards` runs filling the epochs, or a seal of the unsealed units, write the objects one dump
    writes: packs are named by their content and each seal repacks the whole epoch."""
    parts = tmp_path / "parts.zarr"
    _dump(small_shards, parts, shards=(1,))
    assert len([k for k in unit_files(parts) if k.startswith(schema.PACKS_DIR)]) == 2  # epochs 0, 1 of shard 1
    _dump(small_shards, parts, shards=(0,))
    assert unit_files(parts) == unit_files(packed)

    loose = copy(packed, tmp_path, "loose.zarr")
    unseal(loose, GROUP)
    report = seal_units(ObjectStore(str(loose)), GROUP, CacheReader(str(loose)).meta)
    assert (report.sealed, report.left) == ([0, 1], {})
    assert unit_files(loose) == unit_files(packed)


def test_a_flipped_byte_in_a_pack_damages_its_unit_alone_and_repair_restores_the_pack(small_shards, packed,
                                                                                   tmp_path):
    c = copy(packed, tmp_path)
    flip_unit_byte(c, GROUP, 0, 1)
    report = verify_cache(str(c))
    assert report.bad_units() == [(0, 1)], report.problems
    what = " ".join(p["what"] for p in report.problems)
    assert f"{GROUP}/packs/e00000-" in what and "bytes [" in what and "differs from its checksum" in what, what
    r = CacheReader(str(c))
    r.read_unit(0, 0)  # its neighbour in the pack reads
    with pytest.raises(DamagedUnitError, match=r"unit \(epoch 0, shard 1\) is damaged.*packs/e00000-"):
        r.read_unit(0, 1)

    summary = _dump(small_shards, c, repair=True)
    assert (summary.units_written, summary.units_skipped_done) == (1, 3)
    assert unit_files(c) == unit_files(packed)  # the epoch repacked: no garbage left, the clean objects


def test_a_deleted_pack_names_its_units_and_repair_redoes_them(small_shards, packed, tmp_path):
    c = copy(packed, tmp_path)
    path, _, _ = unit_span(c, GROUP, 1, 0)
    os.remove(path)
    r = CliRunner().invoke(main, ["verify", str(c), "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["bad_units"] == [[1, 0], [1, 1]]
    assert all(f"pack {GROUP}/packs/{os.path.basename(path)} is missing" in p["what"] for p in report["problems"])
    summary = _dump(small_shards, c, repair=True)
    assert summary.units_written == 2
    assert unit_files(c) == unit_files(packed)


def _edit_first_entry(c, epoch: int, edit) -> str:
    key = next(k for k in os.listdir(c / GROUP / schema.UNIT_INDEX_DIR) if k.startswith(f"e{epoch:05d}-"))
    path = c / GROUP / schema.UNIT_INDEX_DIR / key
    d = json.loads(path.read_text())
    edit(d["markers"][0])
    path.write_text(json.dumps(d))
    return key


@pytest.mark.parametrize("edit, named", [
    (lambda e: e.update(pack=[0, 10**13]), "beyond the limits"),
    (lambda e: e.update(pack=[-1, 5]), "beyond the limits"),
    (lambda e: e.update(pack=[0.5, 5]), "'pack' must be [offset, length]"),
    (lambda e: e.update(pack="0-5"), "'pack' must be [offset, length]"),
    (lambda e: e.pop("pack"), "without its place in the pack"),
], ids=["huge", "negative", "float", "string", "missing"])
def test_a_malformed_pack_entry_refuses_the_group_naming_its_index(packed, tmp_path, edit, named):
    c = copy(packed, tmp_path)
    key = _edit_first_entry(c, 0, edit)
    with pytest.raises(CacheMetadataError, match=key) as e:
        CacheReader(str(c)).read_unit(0, 0)
    assert named in str(e.value)
    r = CliRunner().invoke(main, ["verify", str(c)])
    assert r.exit_code == 1 and key in r.output and "Traceback" not in r.output, r.output


def test_a_pack_range_longer_than_a_chunk_is_refused_unread(packed, tmp_path, monkeypatch):
    c = copy(packed, tmp_path)
    _edit_first_entry(c, 0, lambda e: e.update(pack=[0, 10**9]))  # within the global limit, not this group's
    reads = []
    real = ObjectStore.get_range
    monkeypatch.setattr(ObjectStore, "get_range", lambda self, *a: reads.append(a) or real(self, *a))
    with pytest.raises(DamagedUnitError, match=r"1000000000 bytes is more than a chunk of this group can take"):
        CacheReader(str(c)).read_unit(0, 0)
    assert reads == []


def test_pack_places_only_in_pack_indexes_and_disagreeing_indexes_are_refused(packed, tmp_path):
    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    marker = c / GROUP / schema.UNITS_DIR / "e00000-s000000.json"
    d = json.loads(marker.read_text())
    marker.write_text(json.dumps({**d, "pack": [0, 100]}))  # a marker object claiming a place in a pack
    with pytest.raises(CacheMetadataError, match="a place in a pack .* outside a pack's unit index"):
        CacheReader(str(c)).read_unit(0, 0)

    c2 = copy(packed, tmp_path, "c2.zarr")
    index_dir = c2 / GROUP / schema.UNIT_INDEX_DIR
    key = next(k for k in os.listdir(index_dir) if k.startswith("e00000-"))
    other = "e00000-" + "0" * 16 + ".json"  # a second index of the epoch with a doctored record of shard 0
    (index_dir / other).write_text((index_dir / key).read_text().replace('"length":12', '"length":11', 1))
    with pytest.raises(CacheMetadataError, match=f"recorded differently by unit indexes .*{other}"):
        CacheReader(str(c2)).read_unit(0, 0)
    r = CliRunner().invoke(main, ["verify", str(c2)])
    assert r.exit_code == 1 and other in r.output and "Traceback" not in r.output, r.output


def test_a_reader_that_read_records_before_a_seal_follows_the_units(packed, tmp_path):
    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    reader = CacheReader(str(c))
    assert all(m.pack is None for m in reader.epoch_markers(0).values())  # records read before the seal
    seal_units(ObjectStore(str(c)), GROUP, reader.meta)  # another process ends its dump: chunk objects deleted
    assert not any(k.startswith(f"{schema.ROWS}/c.") for k in unit_files(c))
    reader.read_unit(0, 1)  # its record is read again and followed into the pack
    assert reader.epoch_markers(0)[1].pack is not None


def test_an_epoch_with_a_damaged_unit_is_left_unsealed_as_it_is(packed, tmp_path):
    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    flip_unit_byte(c, GROUP, 1, 0)
    def epoch_1(files):
        return {k: v for k, v in files.items() if k.startswith(f"{schema.ROWS}/c.1.") or "e00001" in k}

    before = epoch_1(unit_files(c))
    report = seal_units(ObjectStore(str(c)), GROUP, CacheReader(str(c)).meta)
    assert report.sealed == [0] and "unit (epoch 1, shard 0)" in report.left[1], report
    assert epoch_1(unit_files(c)) == before and len(before) == 4  # its 2 chunks and 2 markers: nothing deleted
    assert verify_cache(str(c)).bad_units() == [(1, 0)]


def test_a_seal_stopped_after_its_indexes_leaves_every_unit_readable(packed, tmp_path, monkeypatch):
    c = copy(packed, tmp_path)
    unseal(c, GROUP)

    def killed(self, keys):
        raise OSError("killed")

    monkeypatch.setattr(ObjectStore, "delete_many", killed)
    with pytest.raises(OSError, match="killed"):
        seal_units(ObjectStore(str(c)), GROUP, CacheReader(str(c)).meta)
    monkeypatch.undo()
    files = unit_files(c)  # epoch 0: its pack and index written, its markers and chunk objects still there
    assert any(k.startswith("packs/e00000-") for k in files) and "units/e00000-s000000.json" in files
    assert verify_cache(str(c)).ok
    r = CacheReader(str(c))
    for e, s in UNITS:
        r.read_unit(e, s)
    seal_units(ObjectStore(str(c)), GROUP, r.meta)  # the next dump's end completes it
    assert unit_files(c) == unit_files(packed)


def test_two_sealers_at_once_keep_every_unit(packed, tmp_path, monkeypatch):
    """A second host's seal runs to its end while the first is between writing a pack and its index: both
    write the same objects, and neither deletes a record the other relies on."""
    import logitcache.cache.packs as packs

    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    meta = CacheReader(str(c)).meta
    real, inner = packs.put_index, []

    def put_index(*args, **kwargs):
        if not inner:
            inner.append(None)  # the other seal's own index writes go straight through
            inner[0] = seal_units(ObjectStore(str(c)), GROUP, meta)
        return real(*args, **kwargs)

    monkeypatch.setattr(packs, "put_index", put_index)
    outer = seal_units(ObjectStore(str(c)), GROUP, meta)
    assert inner[0].sealed == [0, 1]
    assert 0 in outer.sealed  # epoch 1 it finds sealed already (its markers gone): left, nothing to do
    assert unit_files(c) == unit_files(packed)
    assert verify_cache(str(c)).ok


def test_an_old_unpacked_index_and_a_pack_index_read_together(packed, tmp_path):
    """A format-2 cache sealed before packs (an unpacked index per epoch, chunk objects) that a later dump
    extends: readers take the records of both kinds."""
    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    objects = ObjectStore(str(c))
    from logitcache.cache.store import read_marker_objects

    markers = read_marker_objects(objects, GROUP)
    for e in range(2):  # the old seal: an unpacked index, markers deleted, chunk objects kept
        objects.put(schema.unit_index_key(GROUP, e), schema.unit_index_bytes(e, [m for (ue, _), m in
                                                                                markers.items() if ue == e]))
    objects.put(schema.unit_marker_key(GROUP, 1, 1), markers[(1, 1)].to_bytes())  # only (1, 1) has a marker
    for e, s in UNITS:
        if (e, s) != (1, 1):
            objects.delete(schema.unit_marker_key(GROUP, e, s))
    r = CacheReader(str(c))
    assert sorted(r.markers()) == UNITS and verify_cache(str(c)).ok
    report = seal_units(objects, GROUP, r.meta)  # epoch 1 has a marker: repacked, its old index superseded
    assert report.sealed == [1]
    names = sorted(os.listdir(c / GROUP / schema.UNIT_INDEX_DIR))
    assert names[0] == "e00000.json" and names[1].startswith("e00001-") and len(names) == 2
    assert verify_cache(str(c)).ok
    with pytest.raises(CacheError):  # the unpacked index's records point at chunk objects, which must exist
        os.remove(c / GROUP / schema.ROWS / "c.0.0.0.0")
        CacheReader(str(c)).read_unit(0, 0)


def test_an_epoch_over_the_pack_size_is_split_into_packs_in_shard_order(packed, tmp_path, monkeypatch):
    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    monkeypatch.setattr(schema, "PACK_MAX_BYTES", 1)  # every unit is more than a pack may hold: one pack each
    report = seal_units(ObjectStore(str(c)), GROUP, CacheReader(str(c)).meta)
    assert report.sealed == [0, 1]
    files = unit_files(c)
    assert len([k for k in files if k.startswith(schema.PACKS_DIR)]) == 4
    assert len([k for k in files if k.startswith(schema.UNIT_INDEX_DIR)]) == 4
    r = CacheReader(str(c))
    assert all(r.unit_marker(e, s).pack.offset == 0 for e, s in UNITS)
    assert verify_cache(str(c)).ok


def test_a_pack_index_over_its_cap_is_not_written_the_epoch_stays_unsealed(packed, tmp_path, monkeypatch):
    """A seal never writes an index its readers would refuse: the epochs keep their markers and chunk objects."""
    from logitcache.cache import store

    c = copy(packed, tmp_path)
    unseal(c, GROUP)
    before = unit_files(c)
    monkeypatch.setitem(store.UNIT_INDEX, "max_bytes", 64)
    report = seal_units(ObjectStore(str(c)), GROUP, CacheReader(str(c)).meta)
    assert report.sealed == [] and sorted(report.left) == [0, 1] and "64 bytes" in report.left[0]
    assert unit_files(c) == before


def test_units_two_indexes_list_are_sealed_again_into_one_record(packed, tmp_path):
    """Two seals of different units at once (here: a second host packed unit (0, 0) alone) leave a unit in two
    packs; the next dump's end seals that epoch again, even with no new unit, leaving the clean objects."""
    c = copy(packed, tmp_path)
    objects = ObjectStore(str(c))
    path, offset, length = unit_span(c, GROUP, 0, 0)
    with open(path, "rb") as f:
        f.seek(offset)
        alone = f.read(length)
    pack_id = schema.pack_id_of(alone)
    record = CacheReader(str(c)).unit_marker(0, 0)
    objects.put(schema.pack_key(GROUP, 0, pack_id), alone)
    entry = dataclasses.replace(record, pack=dataclasses.replace(record.pack, pack_id=pack_id, offset=0))
    objects.put(schema.unit_index_key(GROUP, 0, pack_id), schema.unit_index_bytes(0, [entry]))
    assert len(unit_files(c)) == len(unit_files(packed)) + 2 and verify_cache(str(c)).ok  # a duplicate, readable
    report = seal_units(objects, GROUP, CacheReader(str(c)).meta)
    assert report.sealed == [0]  # no marker object anywhere: epoch 0 is resealed for its duplicate alone
    assert unit_files(c) == unit_files(packed)
