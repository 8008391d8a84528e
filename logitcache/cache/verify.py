"""`info` and `verify`: what a cache is, and whether it is whole, intact, sane and made from the given data.

Metadata first: an invalid zarr.json or marker raises `CacheMetadataError` (a metadata problem, reported as
such: no unit is blamed and `dump --repair` refuses). Then, per finished unit (one with a marker), the reader's
own check (`CacheReader.unit_problems`): each chunk object exists and its sha256 equals the marker's (catches
deleted, truncated or replaced chunks — a deleted chunk would otherwise read as fill values); the chunks decode
(crc32c, blosc sizes); the values are sane (finite, indices in range and distinct, top-k log-probs sorted and
<= 0, top-k mass <= 1). Completeness: every (epoch, shard)
unit has a marker. With ``data``: the shards are the ones the cache was made from. With ``recompute``: N
random cached views are recomputed with the given teacher and compared, which catches other weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.reader import LOGPROB_SLACK, CacheReader
from logitcache.cache.store import ObjectStore, list_groups, unit_index_problems
from logitcache.data.manifest import load_manifest, verify_shards
from logitcache.data.shards import iter_shard
from logitcache.errors import CacheError, ReplayMismatchError
from logitcache.runtime import precision
from logitcache.teacher import Teacher
from logitcache.views import digest as replay_digest
from logitcache.views.mixing import UnitMixer
from logitcache.views.recipe import Recipe

#: unfinished units listed one by one in a report; the rest are counted in one entry (a group declaring 10^5
#: epochs over 10^6 shards must not make verify build 10^11 entries)
MAX_LISTED_UNFINISHED = 100
#: units whose replay digest `verify --data` recomputes (spread over the cache)
REPLAY_UNITS_CHECKED = 4


def cache_info(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata and size figures of every teacher group (JSON-able)."""
    objects = ObjectStore(url, storage_options)
    groups = list_groups(objects)
    if not groups:
        raise CacheError(f"{url} holds no teacher group (is it a logitcache cache?)")
    out: dict[str, Any] = {"cache": url, "groups": {}}
    for g in groups:
        r = CacheReader(url, g, storage_options=storage_options)
        if "root" not in out:
            out["root"] = r.root_meta.to_json()
        meta, markers = r.meta, r.markers()
        views = sum(m.stats.get("views", 0.0) for m in markers.values())
        size = objects.size(g)
        out["groups"][g] = {
            "teacher": meta.teacher, "weights": meta.weights, "weights_digest": meta.weights_digest,
            "recipe": meta.recipe, "k": meta.k, "temperatures": list(meta.temperatures), "seed": meta.seed,
            "epochs": meta.epochs, "value_dtype": meta.value_dtype, "num_classes": meta.num_classes,
            "format": ".".join(map(str, r.root_meta.format_version)), "codec": meta.codec_name,
            "tail": meta.tail_name, **_disk_figures(objects, g, len(markers)),
            "teacher_precision": meta.teacher_precision,
            "teacher_precision_recorded": meta.teacher_precision_recorded,
            "shards": None if meta.shards is None else list(meta.shards), "units_finished": len(markers),
            "units_total": meta.epochs * len(meta.shard_indices(r.root_meta.num_shards)),
            "views": int(views), "bytes": size, "bytes_per_view": size / views if views else None,
            "teacher_top1": sum(m.stats.get("teacher_correct", 0.0) for m in markers.values()) / views
            if views else None,
            "mean_topk_mass": sum(m.stats.get("topk_mass_sum", 0.0) for m in markers.values()) / views
            if views else None,
            "samples_skipped": sum(len(m.skipped) for m in markers.values() if m.epoch == 0),
            "provenance": list(meta.provenance),
        }
    return out


def _disk_figures(objects: ObjectStore, group: str, units: int) -> dict[str, Any]:
    """What a local filesystem allocates for the group (st_blocks, as `du` counts, directories included) and the
    stored objects per finished unit; None on object stores (they bill logical bytes)."""
    if not objects.is_local:
        return {"allocated_bytes": None, "objects_per_unit": None}
    allocated, files, unit_objects = 0, 0, 0
    for dirpath, _dirs, names in os.walk(objects.path(group)):
        allocated += os.stat(dirpath).st_blocks * 512
        in_index = os.path.basename(dirpath) == schema.UNIT_INDEX_DIR  # one object per epoch, not per unit
        for name in names:
            allocated += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            files += 1
            # chunks and markers (the prior's one chunk included); not the per-run records (`runs/`) nor the per-epoch
            # unit indexes
            unit_objects += name != "zarr.json" and os.path.basename(dirpath) != schema.RUNS_DIR and not in_index
    return {"allocated_bytes": allocated, "objects": files,
            "objects_per_unit": unit_objects / units if units else None}


@dataclass
class VerifyReport:
    cache: str
    group: str
    units_checked: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    recompute: dict[str, Any] | None = None
    replay_units_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str, **extra) -> None:
        self.problems.append({"where": where, "what": what, **extra})

    def bad_units(self) -> list[tuple[int, int]]:
        return sorted({(p["epoch"], p["shard"]) for p in self.problems if "epoch" in p and "shard" in p})

    def to_json(self) -> dict[str, Any]:
        return {"cache": self.cache, "group": self.group, "ok": self.ok, "units_checked": self.units_checked,
                "problems": self.problems, "bad_units": [list(u) for u in self.bad_units()],
                "recompute": self.recompute, "replay_units_checked": self.replay_units_checked}


def verify_cache(url: str, group: str | None = None, *, data: str | None = None, check_values: bool = True,
                 storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check a group. Its metadata first: invalid metadata (a zarr.json, a marker) raises `CacheMetadataError`
    — a metadata problem, not damage to units, so nothing is blamed on the units and `--repair` refuses.
    Then each finished unit through the reader's own check (`CacheReader.unit_problems`: presence and sha256
    of every chunk against its marker, decoding, value sanity), and completeness."""
    reader = CacheReader(url, group, storage_options=storage_options)
    report = VerifyReport(url, reader.group)
    root, meta = reader.root_meta, reader.meta
    markers = reader.markers(refresh=True)
    covered = meta.shard_indices(root.num_shards)
    n_unfinished = meta.epochs * len(covered) - sum(1 for (_, s) in markers if s in set(covered))
    listed = 0
    for e in range(meta.epochs):
        if listed >= min(n_unfinished, MAX_LISTED_UNFINISHED):
            break
        for s in covered:
            if (e, s) not in markers:
                report.add(f"unit (epoch {e}, shard {s})", "unfinished: no completion marker", epoch=e, shard=s)
                listed += 1
                if listed >= MAX_LISTED_UNFINISHED:
                    break
    if n_unfinished > listed:
        report.add("units", f"... and {n_unfinished - listed} more unfinished unit(s)")
    if meta.tail_name == "prior":
        try:
            reader.tail  # noqa: B018 - loads the class prior and checks its digest
        except CacheError as err:
            report.add(f"group {reader.group} class prior", str(err))
    for (e, s), marker in sorted(markers.items()):
        report.units_checked += 1
        rows, problems = reader.unit_problems(e, s, marker)
        if rows is not None and meta.packed and check_values:  # format 2: sanity of the decoded rows
            problems = problems + _value_problems(rows.topk(meta), marker, meta)
        for what in problems if check_values else [p for p in problems if "chunk" in p]:
            report.add(f"unit (epoch {e}, shard {s})", what, epoch=e, shard=s)
    for what in unit_index_problems(reader.objects, reader.group):  # readers trust the index: it must agree
        report.add("unit index", f"{what} (a dump of this group rewrites the index)")
    if data is not None:
        data_problems = _data_problems(reader, root, data)
        for what, shard in data_problems:
            report.add(f"data {data}" + (f" shard {shard}" if shard else ""), what)
        if not data_problems:  # the same bytes: do they still become the teacher's pixels here?
            with_digest = [u for u in sorted(markers) if markers[u].replay is not None]
            step = max(1, len(with_digest) // REPLAY_UNITS_CHECKED)
            sample = with_digest[::step][:REPLAY_UNITS_CHECKED]
            try:
                report.replay_units_checked = check_replay(reader, data, Recipe.from_json(meta.recipe),
                                                           units=sample)
            except ReplayMismatchError as e:
                report.add("replay", str(e))
    return report


def _value_problems(tk, marker, meta: schema.GroupMeta) -> list[str]:
    """Sanity of a unit's rows as `TopKLogits` (either format)."""
    valid = np.ones(len(tk), dtype=bool)
    valid[list(marker.skipped)] = False
    j1 = meta.temperatures.index(1.0)
    idx = tk.indices.numpy()[valid]
    lp = (tk.logits - tk.lse[:, j1:j1 + 1]).numpy()[valid]
    tlp, lse = tk.target_logprob.numpy()[valid], tk.lse.numpy()[valid]
    slack = LOGPROB_SLACK
    if meta.packed:  # quantised values: a decoded top-1 may sit a step above 0
        slack = max(slack, 2 * meta.packed_codec().step)
    out = []
    for name, a in (("topk_logprobs", lp), ("target_logprob", tlp), ("lse", lse)):
        if not np.isfinite(a).all():
            out.append(f"{name} has {int((~np.isfinite(a)).sum())} non-finite value(s)")
    if idx.size and (idx.min() < 0 or idx.max() >= meta.num_classes):
        out.append(f"topk_indices outside [0, {meta.num_classes})")
    if idx.size and meta.k > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        out.append("topk_indices repeat a class within a row")
    if lp.size and (np.diff(lp, axis=1) > slack).any():
        out.append("topk_logprobs are not sorted largest first")
    if lp.size and (lp.max() > slack or tlp.max(initial=-np.inf) > slack):
        out.append("a log-probability is > 0")
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    if mass.size and mass.max() > 1 + meta.k * slack:
        out.append(f"top-k mass {mass.max():.6f} > 1")
    return out


def _data_problems(reader, root: schema.RootMeta, data: str) -> list[tuple[str, str | None]]:
    """Differences between the data given and the data the cache was made from, naming shards."""

    manifest = load_manifest(data)
    if manifest.fingerprint == root.dataset_fingerprint:
        problems = []
    else:
        problems = [(f"dataset fingerprint {manifest.fingerprint[:16]}… != the cache's "
                     f"{root.dataset_fingerprint[:16]}…", None)]
    stored = reader.manifest_json()
    shards = stored.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                               for s in shards):
        raise CacheError(f"{reader.url}: {schema.DATASET_MANIFEST_KEY} has no valid 'shards' list")
    stored_shards = {s["name"]: s for s in shards}
    for sh in manifest.to_json().get("shards", []):
        old = stored_shards.get(sh["name"])
        if old is None:
            problems.append(("not in the data the cache was made from", sh["name"]))
            continue
        for key in ("num_samples", "keys_digest", "sha256", "size"):
            if key in old and old.get(key) != sh.get(key):
                problems.append((f"{key} differs from the cache's record", sh["name"]))
    # the shard files themselves must still match the manifest (sha256 of each file)

    for err in verify_shards(manifest):
        problems.append((str(err), None))
    return problems



def recompute_views(url: str, group: str | None, data: str, teacher: str, weights: str | None, n: int, *,
                    seed: int = 0, device: str = "cpu", tolerance: float | None = None,
                    teacher_precision: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recompute ``n`` random cached views with the given teacher and compare with the cache.

    Each view is replayed from its cached parameters (the pixels the teacher saw), the teacher's log-probs at
    the cached top-k classes and at the target are compared with the cached values; a view whose largest
    absolute difference, less the stored dtype's rounding at each value, exceeds ``tolerance`` (nats) is a
    mismatch. The weights digest is compared too. Catches a cache made with other weights.

    ``teacher_precision``: the recomputing teacher's (default: the precision the cache records). ``tolerance``
    (default: `precision.recompute_tolerance` of the two precisions, from their measured error; FORMAT.md).
    """
    reader = CacheReader(url, group, storage_options=storage_options)
    meta, root = reader.meta, reader.root_meta
    manifest = load_manifest(data)
    if manifest.fingerprint != root.dataset_fingerprint:
        raise CacheError(f"--data {data} is not the data {url} was made from (fingerprints differ); "
                         "run verify --data to see which shards")
    markers = reader.markers(refresh=True)
    picks = _pick_views(markers, n, seed, f"{url} group {reader.group}")
    recipe = Recipe.from_json(meta.recipe)
    teacher_precision = teacher_precision or meta.teacher_precision
    if tolerance is None:
        tolerance = precision.recompute_tolerance(meta.teacher_precision, teacher_precision)
    runner = Teacher.load(teacher, weights, meta.num_classes, recipe.image_size, device, meta.seed,
                          normalization=(meta.normalization["mean"], meta.normalization["std"]),
                          precision=teacher_precision)
    views, units = _replay_views(reader, manifest, recipe, markers, picks)
    worst, mismatches = 0.0, []
    with torch.inference_mode():
        for i in range(0, len(views), 64):
            batch = views[i:i + 64]
            lp = torch.log_softmax(runner.logits(torch.stack([v.image for v in batch])).cpu().double(), dim=1)
            for v, lp_v in zip(batch, lp, strict=True):
                diff, excess = _logprob_difference(reader, units[(v.epoch, v.shard)], v, lp_v)
                worst = max(worst, diff)
                if excess > tolerance:
                    mismatches.append({"epoch": v.epoch, "shard": v.shard, "offset": v.offset, "sample": v.where,
                                       "max_abs_logprob_diff": diff})
    if meta.packed:  # format 2's rounding is one constant: report the difference a view may show
        tolerance += meta.packed_codec().logprob_bound
    return {"views": len(views), "tolerance": tolerance, "max_abs_logprob_diff": worst,
            "cache_teacher_precision": meta.teacher_precision, "teacher_precision": teacher_precision,
            "mismatches": mismatches, "weights_digest_cache": meta.weights_digest,
            "weights_digest_given": runner.digest, "weights_digest_equal": runner.digest == meta.weights_digest}


class _ReplayedView(NamedTuple):
    epoch: int
    shard: int
    offset: int
    where: str  # the sample's file:key
    label: int
    image: torch.Tensor


def _pick_views(markers, n: int, seed: int, what: str) -> list[tuple[int, int, int]]:
    """``n`` finished (epoch, shard, offset) views drawn without replacement with ``seed``, in sorted order."""
    candidates = [(e, s, o) for (e, s), m in sorted(markers.items()) for o in range(m.length)
                  if o not in set(m.skipped)]
    if not candidates:
        raise CacheError(f"{what} has no finished views to recompute")
    rng = np.random.default_rng(seed)
    return [candidates[i] for i in sorted(rng.choice(len(candidates), min(n, len(candidates)), replace=False))]


def _replay_views(reader: CacheReader, manifest, recipe: Recipe, markers, picks) -> tuple[list[_ReplayedView], dict]:
    """The picked views replayed as the dump made them (stored params; for mixing recipes the stored partner of
    the same unit, so every sample of a touched unit goes through its `UnitMixer`), and the units read."""
    wanted: dict[int, dict[int, list[int]]] = {}
    for e, s, o in picks:
        wanted.setdefault(s, {}).setdefault(o, []).append(e)
    views: list[_ReplayedView] = []
    units: dict[tuple[int, int], Any] = {}
    for s, offsets in sorted(wanted.items()):
        epochs = sorted({e for es in offsets.values() for e in es})
        units.update({(e, s): reader.read_unit(e, s) for e in epochs})
        mixers = {e: UnitMixer(recipe, seed=reader.meta.seed, epoch=e, shard=s, stored=units[(e, s)].view_params)
                  for e in epochs}
        skipped = {e: set(markers[(e, s)].skipped) for e in epochs}

        def keep(e, finished, s=s, offsets=offsets):
            views.extend(_ReplayedView(e, s, v.sample.offset, v.sample.where, v.sample.label, v.image)
                         for v in finished if e in offsets.get(v.sample.offset, ()))

        for sample in iter_shard(manifest, s, skip_bad=True):
            for e in epochs:
                if sample.offset not in skipped[e]:
                    keep(e, mixers[e].push(sample))
        for e in epochs:
            keep(e, mixers[e].finish())
    return views, units


def _logprob_difference(reader: CacheReader, unit, v: _ReplayedView, lp: torch.Tensor) -> tuple[float, float]:
    """(largest |recomputed - cached| log-probability over the view's top-k and target, the same less what the
    storage may round: the codec's stated bound (format 2) or the stored dtype's rounding (format 1))."""
    meta = reader.meta
    row = reader.topk_rows(unit, [v.offset], [v.label])  # either format
    cached, cached_target = row.topk_log_probs(1.0)[0].double(), row.target_log_probs(1.0)[:1].double()
    d_topk, d_target = (lp[row.indices[0]] - cached).abs(), (lp[v.label] - cached_target).abs()
    diff = max(float(d_topk.max()), float(d_target.max()))
    if meta.packed:  # format 2: the codec's stated bound after normalising (FORMAT.md), not a mismatch
        bound = meta.packed_codec().logprob_bound
        return diff, max(float((d_topk - bound).max()), float((d_target - bound).max()))
    return diff, max(float((d_topk - precision.storage_rounding(cached, meta.value_dtype)).max()),
                     float((d_target - precision.storage_rounding(cached_target, "float32")).max()))


_REPLAY_CHECKED: set[tuple[str, str]] = set()


def check_replay(reader: CacheReader, manifest, recipe: Recipe, *, units: list[tuple[int, int]] | None = None,
                 limit: int = 1, once: bool = False) -> int:
    """Replay the views whose pixel digest the markers of ``units`` record (default: the first ``limit`` finished
    units that record one) and refuse (`ReplayMismatchError`, naming the library versions recorded and found)
    when the pixels differ. ``once``: only the first call per cache group in this process checks. Returns the
    number of units checked (0 for caches written before digests existed)."""
    key = (reader.url, reader.group)
    if once and key in _REPLAY_CHECKED:
        return 0
    manifest = load_manifest(manifest)
    if units is not None:
        markers = {u: reader.unit_marker(*u) for u in units}
        todo = list(units)
    else:  # epoch by epoch (one unit index each), not every marker of the group: training calls this at its start
        markers, todo = {}, []
        for e in range(reader.meta.epochs):
            found = reader.epoch_markers(e)
            markers.update({(e, s): m for s, m in found.items()})
            todo += [(e, s) for s in sorted(found) if found[s].replay is not None][:limit - len(todo)]
            if len(todo) >= limit or (found and not todo):  # enough, or a cache from before the digests
                break
    checked = 0
    for e, s in todo:
        marker = markers.get((e, s))
        if marker is None or marker.replay is None:
            continue
        stored = reader.read_unit(e, s, marker).view_params
        samples = (x for x in iter_shard(manifest, s, skip_bad=True) if x.offset not in set(marker.skipped))
        found = replay_digest.recompute(samples, recipe, marker.replay, seed=reader.meta.seed, epoch=e, shard=s,
                                        stored=stored)
        replay_digest.check(marker.replay, found, f"cache {reader.url} group '{reader.group}' unit (epoch {e}, "
                                                  f"shard {s})")
        checked += 1
    _REPLAY_CHECKED.add(key)
    return checked
