"""Cache read throughput, local disk vs an S3 API (moto's server on 127.0.0.1), in views/s, one run.

A cache of synthetic-teacher logits (1000 classes, k = 10, T = 1 and 4, ImageNet-recipe view params; see
synthetic_teacher.py) is written locally with the real CacheWriter and copied to a bucket on a moto server that
this script starts on loopback, in a process of its own. Then, for each store, three access patterns are timed
(no images decoded):

  units       read every unit once (one chunk object in format 2, the default; 5 with --format 1) and build
              the `TopKLogits` rows of all its views;
  batches     `CacheReader.rows()` per batch of --batch-size views in shard order: each call re-reads the
              unit, as a loader that does not keep the unit between batches would;
  prefetch    `units` with --threads units fetched concurrently (a thread pool; zarr's async I/O underneath).

Each figure is the best of --repeats passes; the ratio is local / S3 in the same run. moto answers from the same
machine (no network latency, but a Python HTTP server per request), so it understates the per-request latency
of real S3 (tens of ms to the first byte) and overstates its per-request CPU cost.

    .venv/bin/python pipelines/bench_reader.py [--shards 16] [--shard-size 1000] [--epochs 2] [--json]

GETs per training epoch (issue 14, ``--only gets``): an ImageNet-shaped cache — --gets-shards 1,281 shards x
--gets-epochs 10 cached epochs, tiny units (2 samples of 28 px each, so the count, not the bytes, is measured) —
on a moto S3 server in this process that counts every request it answers (server side, so DataLoader workers'
requests count too). One training epoch through `CachedViews` + DataLoader, from a fresh reader, with 0 and with
4 workers: the requests it costs, next to the units it reads (1 chunk object each in format 2; 5 with
--format 1). Claims: 4 workers cost the same as 0 (within 1%), and the requests are the units' chunks plus a
constant (opening the cache and one unit index object per epoch; with --gets-without-index also a cache without
them, where the fallback lists the markers and reads the epoch's). The units' chunk objects and markers are
copies of one real unit (their bytes do not matter to the count), the unit
indexes are the dump's (`write_unit_indexes`).

    .venv/bin/python pipelines/bench_reader.py --only gets     # about a minute; the GET table only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_teacher import describe, synthetic_teacher_logits  # noqa: E402

from logitcache.cache import schema  # noqa: E402
from logitcache.cache.reader import CacheReader
from logitcache.cache.writer import CacheWriter  # noqa: E402
from logitcache.labels.codecs import PackedCodec  # noqa: E402
from logitcache.labels.tails import tail_settings  # noqa: E402
from logitcache.labels.topk import TopKLogits  # noqa: E402

C, K, TEMPS = 1000, 10, (1.0, 4.0)
BUCKET = "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.1 (a free port) in its own process, so it does not share this process's GIL
    with the reader; dummy credentials; the endpoint exported for s3fs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto server did not start (is moto[server] installed?)") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint, AWS_EC2_METADATA_DISABLED="true")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    return server, endpoint


def group_meta(recipe, num_classes: int, k: int, temps: tuple[float, ...], epochs: int, fmt: int,
               seed: int = 0) -> schema.GroupMeta:
    """The group metadata of a synthetic cache in format ``fmt`` (2: the packed codec at its defaults, uniform
    tail; 1: float16 values)."""
    kw = {}
    if fmt == 2:
        codec = PackedCodec(k, num_classes, len(temps), len(recipe.param_fields))
        kw = {"codec": codec.to_json(), "tail": tail_settings("uniform", prior_views=0), "value_dtype": None,
              "index_dtype": None}
    return schema.GroupMeta(
        teacher="synthetic", weights=None, weights_digest="-", num_classes=num_classes,
        normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, recipe=recipe.to_json(),
        param_fields=tuple(recipe.param_fields), k=k, temperatures=temps, seed=seed, epochs=epochs, **kw)


def write_cache(url: str, shards: int, shard_size: int, epochs: int, fmt: int = 2, seed: int = 0) -> dict[str, float]:
    """A cache of synthetic-teacher rows in format ``fmt``; returns the teacher's figures (accuracy, top-1 prob,
    top-k mass)."""
    from logitcache.views.recipe import get_recipe, sample_view
    from logitcache.views.rng import view_rng

    recipe = get_recipe("imagenet", 224)
    root = schema.RootMeta("synthetic", C, shards, (shard_size,) * shards,
                           format_version=(2, 0) if fmt == 2 else schema.FORMAT_1)
    w = CacheWriter.create_or_open(url, "synthetic", group_meta(recipe, C, K, TEMPS, epochs, fmt, seed), root, {})
    figures = None
    for e in range(epochs):
        for s in range(shards):
            z, y = synthetic_teacher_logits(shard_size, C, seed=seed + 1000 * e + s)
            if figures is None:
                figures = describe(z, y, ks=(K,))
            tk = TopKLogits.from_logits(z, y, K, TEMPS, keep_rest=fmt == 2)
            views = np.stack([sample_view(view_rng(seed, e, s * shard_size + i), 375, 500, recipe).to_array()
                              for i in range(shard_size)]).astype(np.int16)
            w.write_unit(e, s, np.arange(shard_size), w.encode_rows(tk, views), shard_size, {"views": shard_size})
    return figures


def read_units(url: str, epochs: int, shards: int, threads: int = 1) -> int:
    r = CacheReader(url)
    targets = np.zeros(r.root_meta.max_shard_len, dtype=np.int64)  # the data's labels; not timed here

    def one(unit):
        rows = r.read_unit(*unit)
        tk = r.topk_rows(rows, np.arange(len(rows)), targets[: len(rows)])
        return len(tk.indices)

    units = [(e, s) for e in range(epochs) for s in range(shards)]
    if threads <= 1:
        return sum(one(u) for u in units)
    r.markers()  # open once before the threads share the reader
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, units))


def read_batches(url: str, epochs: int, n_views: int, batch_size: int) -> int:
    r = CacheReader(url)
    done = 0
    for e in range(epochs):
        for start in range(0, n_views, batch_size):
            idx = np.arange(start, min(start + batch_size, n_views))
            tk, _ = r.rows(e, idx, np.zeros(len(idx), dtype=np.int64))
            done += len(tk.indices)
    return done


def best_rate(fn, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


# ------------------------------------------------------------------ GETs per epoch at ImageNet shape
class CountingS3:
    """moto's S3 app on 127.0.0.1 in a thread of this process, counting the requests it answers by kind."""

    def __init__(self):
        import logging
        import threading
        from collections import Counter

        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            method, qs = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
            path = environ.get("PATH_INFO", "").strip("/")
            kind = "LIST" if method == "GET" and ("/" not in path or "list-type" in qs) else method
            with self._lock:
                self.counts[kind] += 1
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def stop(self) -> None:
        self._server.shutdown()


def imagenet_shaped_cache(tmp: str, shards: int, epochs: int, per_shard: int = 2,
                          fmt: int = 2) -> tuple[str, dict[str, bytes]]:
    """Data shards (``per_shard`` 28 px PNGs each) on local disk, and the objects of a cache over them:
    ``shards x epochs`` units, each a copy of one real unit, with markers and the dump's unit indexes."""
    import io

    import torch
    from PIL import Image

    from logitcache.cache.store import read_markers
    from logitcache.data.manifest import load_manifest
    from logitcache.data.write import write_shards
    from logitcache.views.recipe import get_recipe, sample_view
    from logitcache.views.rng import view_rng

    rng = np.random.default_rng(0)

    def samples():
        for i in range(shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
            yield f"s{i:07d}", {"png": buf.getvalue(), "cls": str(i % 10).encode()}

    data = os.path.join(tmp, "data")
    write_shards(samples(), data, class_names=[str(c) for c in range(10)], samples_per_shard=per_shard)
    manifest = load_manifest(data)
    recipe = get_recipe("small", 28)
    root = schema.RootMeta(manifest.fingerprint, 10, shards, tuple(s.num_samples for s in manifest.shards),
                           format_version=(2, 0) if fmt == 2 else schema.FORMAT_1)
    meta = group_meta(recipe, 10, 3, (1.0,), epochs, fmt)
    local = os.path.join(tmp, "template.zarr")
    writer = CacheWriter.create_or_open(local, "synthetic", meta, root, manifest.to_json())
    g = torch.Generator().manual_seed(0)
    tk = TopKLogits.from_logits(torch.randn(per_shard, 10, generator=g), torch.arange(per_shard) % 10, 3, (1.0,),
                                keep_rest=fmt == 2)
    views = np.stack([sample_view(view_rng(0, 0, i), 28, 28, recipe).to_array() for i in range(per_shard)])
    template = writer.write_unit(0, 0, np.arange(per_shard), writer.encode_rows(tk, views), per_shard,
                                 {"views": float(per_shard)})
    objects: dict[str, bytes] = {}
    for dirpath, _, files in os.walk(local):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                objects[os.path.relpath(path, local)] = fh.read()
    chunks = {name: objects[key] for name, key in schema.unit_chunk_keys("synthetic", meta, 0, 0).items()}
    per_epoch: dict[int, list] = {}
    for e in range(epochs):
        for s in range(shards):
            for name, key in schema.unit_chunk_keys("synthetic", meta, e, s).items():
                objects[key] = chunks[name]
            m = schema.UnitMarker(e, s, per_shard, template.chunks, template.stats, ())
            objects[schema.unit_marker_key("synthetic", e, s)] = m.to_bytes()
            per_epoch.setdefault(e, []).append(m)
    for e, markers in per_epoch.items():
        objects[schema.unit_index_key("synthetic", e)] = schema.unit_index_bytes(e, markers)
    assert len(read_markers(writer.objects, "synthetic")) == 1  # the template; the rest exist only in S3
    return data, objects


def gets_per_epoch(args) -> dict:
    """Requests for one training epoch, 0 vs 4 workers, with and without the unit indexes (see the docstring)."""
    import s3fs
    import torch
    from moto.s3.models import s3_backends

    from logitcache.replay import CachedViews, collate

    server = CountingS3()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=server.endpoint, AWS_EC2_METADATA_DISABLED="true")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            data, objects = imagenet_shaped_cache(tmp, args.gets_shards, args.gets_epochs, fmt=args.format)
            n_arrays = 1 if args.format == 2 else len(schema.ARRAY_NAMES)  # chunk objects per unit
            backend = s3_backends["123456789012"]["aws"]
            backend.create_bucket(BUCKET, "us-east-1")
            for key, value in objects.items():
                backend.put_object(BUCKET, f"cache.zarr/{key}", value)
            setup_s = time.perf_counter() - t0
            url = f"s3://{BUCKET}/cache.zarr"
            rows = []
            cases = [(True, 0), (True, 4)] + ([(False, 0), (False, 4)] if args.gets_without_index else [])
            for index, workers in cases:
                if not index:
                    for e in range(args.gets_epochs):
                        backend.delete_object(BUCKET, f"cache.zarr/{schema.unit_index_key('synthetic', e)}")
                s3fs.S3FileSystem.clear_instance_cache()
                server.reset()
                views = CachedViews(data, url, epoch=0, shuffle_seed=0)  # a fresh reader: opening counts too
                loader = torch.utils.data.DataLoader(views, batch_size=64, num_workers=workers, collate_fn=collate,
                                                     multiprocessing_context="fork" if workers else None)
                samples = sum(len(b[-1]) for b in loader)
                counts = server.snapshot()
                units = args.gets_shards
                rows.append({"unit_index": index, "workers": workers, "samples": samples, "units_read": units,
                             "chunk_objects": units * n_arrays, "requests": counts,
                             "gets": counts.get("GET", 0), "total": sum(counts.values()),
                             "get_overhead": counts.get("GET", 0) - units * n_arrays})
    finally:
        server.stop()
    by = {(r["unit_index"], r["workers"]): r for r in rows}
    return {"shards": args.gets_shards, "cached_epochs": args.gets_epochs, "objects": len(objects),
            "format": args.format, "chunk_objects_per_unit": n_arrays,
            "setup_seconds": setup_s, "rows": rows,
            "gets_ratio_4_over_0_workers": by[(True, 4)]["gets"] / by[(True, 0)]["gets"],
            "requests_ratio_4_over_0_workers": by[(True, 4)]["total"] / by[(True, 0)]["total"],
            "gets_ratio_4_over_0_workers_without_index":
                by[(False, 4)]["gets"] / by[(False, 0)]["gets"] if args.gets_without_index else None}


def print_gets(g: dict) -> None:
    n_arrays = g["chunk_objects_per_unit"]
    print(f"GETs per training epoch, format {g['format']}: {g['shards']} shards x {g['cached_epochs']} cached "
          f"epochs ({g['objects']:,} "
          f"objects on moto S3); one epoch reads {g['shards']} units = {g['shards'] * n_arrays:,} chunk objects")
    print(f"{'unit index':>10s} {'workers':>7s} {'GET':>7s} {'GET - chunks':>12s} {'LIST':>5s} {'HEAD':>6s} "
          f"{'all requests':>12s}")
    for r in g["rows"]:
        c = r["requests"]
        print(f"{'yes' if r['unit_index'] else 'no':>10s} {r['workers']:7d} {r['gets']:7,d} {r['get_overhead']:12,d} "
              f"{c.get('LIST', 0):5d} {c.get('HEAD', 0):6,d} {r['total']:12,d}")
    ratio = g["gets_ratio_4_over_0_workers"]
    overhead = max(r["get_overhead"] for r in g["rows"] if r["unit_index"])
    verdict = "OK" if abs(ratio - 1) <= 0.01 else "NOT MET"
    print(f"GETs, 4 workers / 0 workers = {ratio:.4f} (claim: within 1%: {verdict}); all requests "
          f"{g['requests_ratio_4_over_0_workers']:.4f}")
    print(f"GETs beyond the units' chunk objects: at most {overhead} (claim: a constant — opening the cache and one "
          f"unit index — not a multiple of shards, epochs or workers: {'OK' if overhead <= 16 else 'NOT MET'}); "
          f"s3fs sends a HEAD before each GET")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000, help="views per unit (a shard's sample count)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8, help="concurrent unit reads in the prefetch pattern")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gets-shards", type=int, default=1281, help="shards of the ImageNet-shaped cache (GETs)")
    ap.add_argument("--gets-epochs", type=int, default=10, help="cached epochs of the ImageNet-shaped cache (GETs)")
    ap.add_argument("--gets-without-index", action="store_true", help="also count a cache without unit indexes")
    ap.add_argument("--only", choices=("gets", "throughput"), default=None)
    ap.add_argument("--format", type=int, choices=(1, 2), default=2, help="cache format (2: one chunk per unit)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import fsspec
    import torch

    torch.set_num_threads(1)
    gets = gets_per_epoch(args) if args.only in (None, "gets") else None
    if args.only == "gets":
        print(json.dumps({"gets_per_epoch": gets}, indent=1)) if args.json else print_gets(gets)
        return
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.zarr")
            teacher = write_cache(local, args.shards, args.shard_size, args.epochs, args.format)
            fs = fsspec.filesystem("s3")
            fs.mkdir(BUCKET)
            fs.put(local, f"{BUCKET}/cache.zarr", recursive=True)
            remote = f"s3://{BUCKET}/cache.zarr"
            n_views = args.shards * args.shard_size
            unit_bytes = CacheReader(local).objects.size("synthetic") / (args.shards * args.epochs)
            patterns = {
                "units": lambda url: best_rate(lambda: read_units(url, args.epochs, args.shards), args.repeats),
                "batches": lambda url: best_rate(
                    lambda: read_batches(url, args.epochs, n_views, args.batch_size), args.repeats),
                "prefetch": lambda url: best_rate(
                    lambda: read_units(url, args.epochs, args.shards, args.threads), args.repeats),
            }
            results = {}
            for name, run in patterns.items():
                results[name] = {"local": run(local), "s3": run(remote)}
                results[name]["local_over_s3"] = results[name]["local"] / results[name]["s3"]
    finally:
        server.terminate()
        server.wait(10)

    report = {
        "setup": {"shards": args.shards, "shard_size": args.shard_size, "epochs": args.epochs, "k": K,
                  "classes": C, "temperatures": list(TEMPS), "batch_size": args.batch_size,
                  "threads": args.threads, "bytes_per_unit": unit_bytes, "format": args.format,
                  "bytes_per_view": unit_bytes / args.shard_size, "logit_source": "synthetic_teacher",
                  "teacher": teacher, "s3": f"moto server (own process) at {endpoint}",
                  "cpu": platform.processor() or "?", "torch_threads": 1},
        "views_per_s": results,
        "gets_per_epoch": gets,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    s = report["setup"]
    print(f"cache (format {s['format']}): {s['shards']} shards x {s['shard_size']} views x {s['epochs']} epochs, "
          f"k={K}, C={C}, "
          f"{s['bytes_per_view']:.1f} B/view, {s['bytes_per_unit'] / 1024:.1f} KiB/unit; synthetic teacher "
          f"top-1 prob {teacher['mean_top1_prob']:.2f}, top-{K} mass {teacher[f'mean_top{K}_mass']:.2f}")
    print(f"{'pattern':10s} {'local views/s':>14s} {'S3 (moto) views/s':>18s} {'local/S3':>9s}")
    for name, r in results.items():
        print(f"{name:10s} {r['local']:14,.0f} {r['s3']:18,.0f} {r['local_over_s3']:9.2f}")
    if gets is not None:
        print()
        print_gets(gets)


if __name__ == "__main__":
    main()
