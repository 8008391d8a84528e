"""`logitcache shards`: write webdataset shards + manifest (Fashion-MNIST, image folders) or scan existing ones."""

from __future__ import annotations

import click

from logitcache.cli.options import (
    _print_json,
    json_option,
    out_option,
    reports_errors,
)


# ---------------------------------------------------------------- shards (the data: tar shards + manifest)
def _shard_size_options(fn):
    fn = click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1),
                      help="samples per shard")(fn)
    fn = click.option("--max-bytes", default=None, type=click.IntRange(min=1),
                      help="also close a shard before it would exceed this many bytes")(fn)
    fn = click.option("--overwrite", is_flag=True, help="replace a dataset already in --out")(fn)
    return fn


def _echo_manifest(what: str, m) -> None:
    click.echo(f"{what}: {len(m.shards)} shard(s), {m.num_samples} samples, {m.num_classes} classes, "
               f"fingerprint {m.fingerprint}")


@click.group()
def shards() -> None:
    """Write ImageNet-style webdataset shards (tar of <key>.jpg|png + <key>.cls) with a manifest.json,
    or build the manifest for shards someone else made. Output is deterministic."""


@shards.command("fashion-mnist")
@click.option("--src", default="/usr/share/datasets/fashion-mnist/", show_default=True,
              help="directory holding the IDX files (train/t10k-images/labels-idx*-ubyte[.gz])")
@out_option("directory to create: OUT/train and OUT/test, each with its manifest.json")
@_shard_size_options
@reports_errors
def shards_fashion_mnist(src, out, samples_per_shard, max_bytes, overwrite):
    """Fashion-MNIST from its IDX files: lossless grayscale PNGs, the 10 class names, file order kept."""
    from logitcache.data.convert.fashion_mnist import write_fashion_mnist

    manifests = write_fashion_mnist(src, out, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                                    overwrite=overwrite)
    for split, m in manifests.items():
        _echo_manifest(f"{out.rstrip('/')}/{split}", m)


@shards.command("folder")
@click.argument("src")
@out_option("directory (or URL) to create, with the shards and manifest.json")
@_shard_size_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="shuffle the files with this seed so each shard mixes classes")
@click.option("--no-shuffle", is_flag=True, help="keep sorted class order (shards then hold one class or two)")
@reports_errors
def shards_folder(src, out, samples_per_shard, max_bytes, overwrite, seed, no_shuffle):
    """An ImageFolder tree SRC/<class>/*.JPEG (e.g. ImageNet's train/): class index = sorted class order;
    image bytes are copied as they are, never re-encoded."""
    from logitcache.data.convert.folder import write_image_folder

    m = write_image_folder(src, out, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                           shuffle_seed=None if no_shuffle else seed, overwrite=overwrite)
    _echo_manifest(out, m)


@shards.command("scan")
@click.argument("directory")
@click.option("--classes", "classes_file", default=None,
              help="class names: a text file with one per line, or a JSON list (index = position)")
@click.option("--num-classes", default=None, type=click.IntRange(min=1),
              help="number of classes when there are no names (default: the largest label + 1)")
@click.option("--force", is_flag=True, help="replace an existing DIRECTORY/manifest.json")
@json_option()
@reports_errors
def shards_scan(directory, classes_file, num_classes, force, as_json):
    """Write DIRECTORY/manifest.json for the *.tar shards in DIRECTORY (natural name order), reading each
    shard once for its size, sha256, key count and key digest."""
    from logitcache.data.convert.scan import scan_directory

    target = directory.rstrip("/") + "/manifest.json"
    m = scan_directory(directory, classes_file=classes_file, num_classes=num_classes, force=force)
    if as_json:
        _print_json({"manifest": target, "shards": len(m.shards), "samples": m.num_samples,
                     "num_classes": m.num_classes, "fingerprint": m.fingerprint})
    else:
        _echo_manifest(target, m)
