"""Cache read throughput, local disk vs an S3 API (moto's server on 127.0.0.1), in views/s, one run.

A cache of synthetic-teacher logits (1000 classes, k = 10, T = 1 and 4, ImageNet-recipe view params; see
synthetic_teacher.py) is written locally with the real CacheWriter and copied to a bucket on a moto server that
this script starts on loopback, in a process of its own. Then, for each store, three access patterns are timed
(no images decoded):

  units       read every unit once (5 chunk objects) and build the `TopKLogits` rows of all its views;
  batches     `CacheReader.rows()` per batch of --batch-size views in shard order: each call re-reads the
              unit, as a loader that does not keep the unit between batches would;
  prefetch    `units` with --threads units fetched concurrently (a thread pool; zarr's async I/O underneath).

Each figure is the best of --repeats passes; the ratio is local / S3 in the same run. moto answers from the same
machine (no network latency, but a Python HTTP server per request), so it understates the per-request latency
of real S3 (tens of ms to the first byte) and overstates its per-request CPU cost.

    .venv/bin/python pipelines/bench_reader.py [--shards 16] [--shard-size 1000] [--epochs 2] [--json]
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
from logitcache.cache.schema import UnitRows  # noqa: E402
from logitcache.cache.writer import CacheWriter
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


def write_cache(url: str, shards: int, shard_size: int, epochs: int, seed: int = 0) -> dict[str, float]:
    """A cache of synthetic-teacher rows; returns the teacher's figures (accuracy, top-1 prob, top-k mass)."""
    from logitcache.views.recipe import get_recipe, sample_view
    from logitcache.views.rng import view_rng

    recipe = get_recipe("imagenet", 224)
    root = schema.RootMeta("synthetic", C, shards, (shard_size,) * shards, format_version=schema.FORMAT_1)
    meta = schema.GroupMeta(
        teacher="synthetic", weights=None, weights_digest="-", num_classes=C,
        normalization={"mean": [0.0] * 3, "std": [1.0] * 3}, recipe=recipe.to_json(),
        param_fields=tuple(recipe.param_fields), k=K, temperatures=TEMPS, seed=seed, epochs=epochs,
    )
    w = CacheWriter.create_or_open(url, "synthetic", meta, root, {})
    figures = None
    for e in range(epochs):
        for s in range(shards):
            z, y = synthetic_teacher_logits(shard_size, C, seed=seed + 1000 * e + s)
            if figures is None:
                figures = describe(z, y, ks=(K,))
            tk = TopKLogits.from_logits(z, y, K, TEMPS)
            views = np.stack([sample_view(view_rng(seed, e, s * shard_size + i), 375, 500, recipe).to_array()
                              for i in range(shard_size)]).astype(np.int16)
            rows = UnitRows(tk.indices.numpy().astype(meta.index_dtype),
                            (tk.logits - tk.lse[:, :1]).numpy().astype("float16"), tk.target_logprob.numpy(),
                            tk.lse.numpy(), views)
            w.write_unit(e, s, np.arange(shard_size), rows, shard_size, {"views": shard_size})
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000, help="views per unit (a shard's sample count)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8, help="concurrent unit reads in the prefetch pattern")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import fsspec
    import torch

    torch.set_num_threads(1)
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.zarr")
            teacher = write_cache(local, args.shards, args.shard_size, args.epochs)
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
                  "threads": args.threads, "bytes_per_unit": unit_bytes,
                  "bytes_per_view": unit_bytes / args.shard_size, "logit_source": "synthetic_teacher",
                  "teacher": teacher, "s3": f"moto server (own process) at {endpoint}",
                  "cpu": platform.processor() or "?", "torch_threads": 1},
        "views_per_s": results,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    s = report["setup"]
    print(f"cache: {s['shards']} shards x {s['shard_size']} views x {s['epochs']} epochs, k={K}, C={C}, "
          f"{s['bytes_per_view']:.1f} B/view, {s['bytes_per_unit'] / 1024:.1f} KiB/unit; synthetic teacher "
          f"top-1 prob {teacher['mean_top1_prob']:.2f}, top-{K} mass {teacher[f'mean_top{K}_mass']:.2f}")
    print(f"{'pattern':10s} {'local views/s':>14s} {'S3 (moto) views/s':>18s} {'local/S3':>9s}")
    for name, r in results.items():
        print(f"{name:10s} {r['local']:14,.0f} {r['s3']:18,.0f} {r['local_over_s3']:9.2f}")


if __name__ == "__main__":
    main()
