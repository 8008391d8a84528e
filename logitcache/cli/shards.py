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
    or build the manifest for webdataset shards as they are. Output is deterministic."""


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


def _class_name_options(fn):
    fn = click.option("--classes", "classes_file", default=None,
                      help="class names: a text file (one per line; ImageNet's LOC_synset_mapping.txt gives its "
                           "synsets), a JSON list, or a JSON object index -> name or [id, name]")(fn)
    fn = click.option("--class-folders", default=None,
                      help="class names = the sorted folder names in this directory (e.g. ImageNet's train/ "
                           "synset folders)")(fn)
    fn = click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                      help="processes reading and hashing in parallel (the output does not depend on it)")(fn)
    return fn


def _class_names(classes_file, class_folders):
    from logitcache.data.convert.folder import image_folder_classes
    from logitcache.data.convert.scan import read_class_names

    if classes_file is not None and class_folders is not None:
        raise click.UsageError("give --classes or --class-folders, not both")
    if classes_file is not None:
        return read_class_names(classes_file)
    return image_folder_classes(class_folders) if class_folders is not None else None


@shards.command("folder")
@click.argument("src")
@out_option("directory (or URL) to create, with the shards and manifest.json")
@_shard_size_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="shuffle the files with this seed so each shard mixes classes")
@click.option("--no-shuffle", is_flag=True, help="keep sorted order (an ImageFolder tree: shards then hold one "
              "class or two; a flat folder: file-name order)")
@click.option("--labels", default=None,
              help="SRC is a flat folder (ImageNet's val/) and this file labels its images: 'file label' lines "
                   "(Caffe's val.txt), LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt "
                   "(with the devkit's meta.mat next to it)")
@_class_name_options
@reports_errors
def shards_folder(src, out, samples_per_shard, max_bytes, overwrite, seed, no_shuffle, labels, classes_file,
                  class_folders, workers):
    """An ImageFolder tree SRC/<class>/*.JPEG (e.g. ImageNet's train/): class index = sorted class order (or the
    order of --classes); or, with --labels, a flat folder (ImageNet's val/). Image bytes are copied as they are,
    never re-encoded."""
    from logitcache.data.convert.folder import write_image_folder

    m = write_image_folder(src, out, samples_per_shard=samples_per_shard, max_bytes=max_bytes,
                           shuffle_seed=None if no_shuffle else seed, overwrite=overwrite, workers=workers,
                           labels=labels, class_names=_class_names(classes_file, class_folders))
    _echo_manifest(out, m)


@shards.command("scan")
@click.argument("source")
@click.option("--out", default=None,
              help="where manifest.json goes: a directory, or a .json path (default: the shards' directory)")
@_class_name_options
@click.option("--num-classes", default=None, type=click.IntRange(min=1),
              help="number of classes when there are no names (default: the largest label + 1)")
@click.option("--label-key", default=None,
              help="labels are at this key path in each sample's .json member (e.g. label or meta.label), "
                   "not in a .cls member")
@click.option("--force", is_flag=True, help="replace an existing manifest.json")
@json_option()
@reports_errors
def shards_scan(source, out, classes_file, class_folders, workers, num_classes, label_key, force, as_json):
    """Write a manifest.json for webdataset shards as they are. SOURCE: a directory (its *.tar, *.tar.gz, *.tgz in
    natural name order), a brace pattern ('imagenet-train-{000000..001281}.tar', also s3://... and
    'pipe:curl -s https://host/shard-{000..099}.tar'), or a URL list file (.txt, one shard per line). Each shard
    is read once for its size, sha256, key count and key digest."""
    from logitcache.data.convert.scan import scan_source

    m, target = scan_source(source, out=out, class_names=_class_names(classes_file, class_folders),
                            num_classes=num_classes, label_key=label_key, workers=workers, force=force)
    if as_json:
        _print_json({"manifest": target, "shards": len(m.shards), "samples": m.num_samples,
                     "num_classes": m.num_classes, "fingerprint": m.fingerprint, "label_key": m.label_key})
    else:
        _echo_manifest(target, m)
