"""Converters: datasets in other layouts -> shards + manifest (Fashion-MNIST IDX files, image folders), and
`scan`, which builds the manifest for shards someone else made."""

from logitcache.data.convert.fashion_mnist import FASHION_MNIST_CLASSES, write_fashion_mnist
from logitcache.data.convert.folder import write_image_folder
from logitcache.data.convert.scan import build_manifest, list_shards, scan_shard

__all__ = ["FASHION_MNIST_CLASSES", "build_manifest", "list_shards", "scan_shard", "write_fashion_mnist",
           "write_image_folder"]
