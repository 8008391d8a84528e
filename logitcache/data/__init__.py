"""Stage 0, the data: webdataset-style tar shards, their manifest (fingerprint, global indices), decoding,
the rank/worker split, and converters that write shards (`convert/`).

    manifest.py  what the dataset is (shards, sizes, sha256, key digests, class names, fingerprint)
    tar.py       tar stream -> (member, bytes) -> samples grouped by key
    decode.py    raw sample -> (uint8 image, label); every failure names url:key
    shards.py    iter_shard / ShardDataset / shuffle_buffer: the reading pipeline stages
    split.py     --shards selections and the exactly-once rank x worker split
    write.py     deterministic shard writing; convert/ builds on it (Fashion-MNIST, image folders, scan)
"""

from logitcache.data.decode import decode_image, decode_sample
from logitcache.data.manifest import Manifest, ShardInfo, load_manifest, verify_shards
from logitcache.data.shards import Sample, ShardDataset, SkipStats, iter_shard, shuffle_buffer
from logitcache.data.split import parse_shard_selection, split_shards
from logitcache.data.write import write_shards

__all__ = [
    "Manifest", "Sample", "ShardDataset", "ShardInfo", "SkipStats", "decode_image", "decode_sample", "iter_shard",
    "load_manifest", "parse_shard_selection", "shuffle_buffer", "split_shards", "verify_shards", "write_shards",
]
