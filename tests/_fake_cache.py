"""A small cache written straight through CacheWriter, for cache/verify tests.

It is a FORMAT 1 cache (five arrays), written through the format-1 writer path that stays for that purpose: the
tests that use it are also the tests that format-1 caches stay readable and verifiable."""

import numpy as np
import torch

from logitcache.cache import schema
from logitcache.cache.schema import UnitRows
from logitcache.cache.writer import CacheWriter
from logitcache.labels.topk import TopKLogits

C, K = 100, 5
SHARD_LENGTHS = (6, 4)


def _metas(epochs=2, k=K, fingerprint="a" * 64):
    root = schema.RootMeta(fingerprint, C, len(SHARD_LENGTHS), SHARD_LENGTHS, format_version=schema.FORMAT_1)
    meta = schema.GroupMeta(
        teacher="resnet34", weights="teacher.pt", weights_digest="b" * 64, num_classes=C,
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, recipe={"name": "small", "version": 1},
        param_fields=("top", "left", "flip"), k=k, temperatures=(1.0, 4.0), seed=0, epochs=epochs,
    )
    return root, meta


def _unit(epoch, shard, n, k=K):
    g = torch.Generator().manual_seed(1000 * epoch + shard)
    z = torch.randn(n, C, generator=g) * 4
    target = torch.randint(0, C, (n,), generator=g)
    tk = TopKLogits.from_logits(z, target, k, (1.0, 4.0))
    rows = UnitRows(
        topk_indices=tk.indices.numpy().astype(np.int16),
        topk_logprobs=(tk.logits - tk.lse[:, :1]).numpy().astype(np.float16),
        target_logprob=tk.target_logprob.numpy(),
        lse=tk.lse.numpy(),
        view_params=torch.randint(0, 9, (n, 3), generator=g).numpy().astype(np.int16),
    )
    return tk, rows


def write_fake_cache(url):
    """A 2-epoch, 2-shard cache of random teacher logits (no teacher, no data): (url, {(e, s): (tk, rows)})."""
    root, meta = _metas()
    w = CacheWriter.create_or_open(url, "resnet34", meta, root, {"fingerprint": "a" * 64})
    expected = {}
    for e in range(2):
        for s, n in enumerate(SHARD_LENGTHS):
            tk, rows = _unit(e, s, n)
            w.write_unit(e, s, np.arange(n), rows, n, {"views": n})
            expected[(e, s)] = (tk, rows)
    return url, expected
