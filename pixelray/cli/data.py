"""``pixelray data ...`` and ``pixelray prepare ...``: validate data sets and convert images into shards.

A thin shell over :mod:`pixelray.shards` and :mod:`pixelray.datasets`: it parses,
starts a local Ray when a converter needs one and none is running, calls the
library, and prints. Exit codes: 0 fine; 1 the data has problems (``data check``)
or files were skipped (``prepare``, unless ``--allow-skipped``); 2 bad input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Annotated

import typer

from pixelray.cli.common import fail
from pixelray.errors import first_line

__all__ = ["data_app", "prepare_app"]

data_app = typer.Typer(
    help="Inspect and validate pixelray data sets (Parquet shards + manifest.json).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[output]" and the like
    add_completion=False,
)
prepare_app = typer.Typer(
    help="Convert images into pixelray shards: ImageNet validation, any image folder, or synthetic data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[output]" and the like
    add_completion=False,
)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------- data


#: below this clean accuracy under a model that knows the classes, a data set is flagged as mislabelled
#: (pretrained ImageNet models reach 56-78% on ImageNet validation; wrong labels give ~0.1%)
MISLABELLED_BELOW = 0.5


@data_app.command("check")
def check_cmd(
    root: Annotated[str, typer.Argument(help="Data set directory or URI (s3://..., file://...).")],
    model: Annotated[str | None, typer.Option(
        "--model", help="Also check the labels: the clean accuracy of this model (a torchvision name whose "
                        "pretrained weights are cached, or checkpoint:PATH) on --images images spread over the "
                        "data set; below 50% the labels are flagged as wrong.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="Pretrained weights of --model.")] = "imagenet",
    images: Annotated[int, typer.Option("--images", min=1, help="Images the --model check evaluates.")] = 500,
) -> None:
    """Validate a data set: schema, image shapes, labels, duplicate ids, checksums, unreadable Parquet.

    Prints each problem (naming the file and rows) and exits 1 when there is any;
    prints "ok: N images in K shards" otherwise, then the images per class (fewest and
    most; the ImageNet validation set has 50 in each of 1000 classes). With --model, the
    model's accuracy on a sample: below 50% the data set is flagged as mislabelled (exit 1);
    pretrained weights that are not cached skip this check, saying so (nothing is downloaded).

    Example: pixelray data check data/imagenet-val --model resnet101
    """
    from pixelray.shards import check_dataset, load_manifest
    from pixelray.shards.check import class_counts, class_counts_line

    problems = check_dataset(root)
    if problems:
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
        typer.echo(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {root}", err=True)
        raise typer.Exit(1)
    manifest = load_manifest(root)
    typer.echo(f"ok: {manifest.num_images} images in {len(manifest.shards)} shards")  # fixed format: scripts parse it
    typer.echo(class_counts_line(manifest, class_counts(root, manifest)))
    if model is not None:
        _label_check(root, manifest, model, weights, images)


def _label_check(root: str, manifest, spec: str, weights: str, n: int) -> None:
    """The model's accuracy on ``n`` images spread over the data set; exit 1 below :data:`MISLABELLED_BELOW`."""
    import numpy as np
    import torch

    from pixelray.models import WeightsMissingError, load_for_data
    from pixelray.shards import read_shard, shard_uri

    try:
        net = load_for_data(spec, weights, manifest.num_classes)
    except WeightsMissingError as exc:
        typer.echo(f"labels: not checked ({first_line(exc)})", err=True)
        return
    except ValueError as exc:
        fail(f"--model {spec}: {first_line(exc)}")
    shards = manifest.shards
    # the sample: evenly spaced over up to 8 shards, evenly spaced inside each
    picked = sorted(set(np.linspace(0, len(shards) - 1, min(len(shards), 8, n)).round().astype(int)))
    per_shard = -(-n // len(picked))  # ceil
    correct = seen = 0
    with torch.inference_mode():
        for i in picked:
            batch = read_shard(shard_uri(root, shards[i].file))
            keep = np.linspace(0, len(batch.labels) - 1, min(per_shard, len(batch.labels), n - seen)).round()
            keep = torch.as_tensor(keep.astype(np.int64))
            for chunk in keep.split(64):
                correct += int((net(batch.images[chunk]).argmax(1) == batch.labels[chunk]).sum())
            seen += len(keep)
    rate = correct / seen
    line = f"labels: {spec} classifies {correct} of {seen} images correctly ({rate:.1%})"
    if rate < MISLABELLED_BELOW:
        typer.echo(f"problem: {line}, below {MISLABELLED_BELOW:.0%}: the labels look wrong (for ImageNet: "
                   "the class map given to `pixelray prepare imagenet`, see README.md)", err=True)
        raise typer.Exit(1)
    typer.echo(line)


@data_app.command("info")
def info_cmd(
    root: Annotated[str, typer.Argument(help="Data set directory or URI (s3://..., file://...).")],
) -> None:
    """Print a data set's manifest in short: name, source, shape, images, classes, shards."""
    from pixelray.shards import ShardError, load_manifest

    try:
        m = load_manifest(root)
    except ShardError as exc:
        fail(str(exc))
    typer.echo(f"{m.name}: {m.num_images} images, {m.height}x{m.width} RGB, {m.num_classes} classes, "
               f"{_count(len(m.shards), 'shard')}, source {m.source}")
    shown = ", ".join(f"{i}={c}" for i, c in zip(m.class_ids[:5], m.class_names[:5], strict=False))
    typer.echo(f"classes: {shown}{', ...' if m.num_classes > 5 else ''}")


# ---------------------------------------------------------------------------- prepare

RowsOpt = Annotated[int, typer.Option("--rows-per-shard", min=1, help="Images per shard file.")]
FilesOpt = Annotated[int, typer.Option("--files-per-task", min=1, help="Image files decoded per Ray task.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="CPUs of the local Ray started when none is running (default: all)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", envvar="RAY_ADDRESS",
                 help="Connect to this Ray cluster instead of starting a local one (env RAY_ADDRESS)."),
]
CompressionOpt = Annotated[
    str, typer.Option("--compression", help="Parquet codec of the shards: zstd, lz4, snappy or none.")
]
SkippedOpt = Annotated[
    bool, typer.Option("--allow-skipped", help="Exit 0 even when unreadable files were skipped.")
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


@contextlib.contextmanager
def _ray(address: str | None, workers: int | None) -> Iterator[None]:
    """Use the running Ray, or connect to ``address``, or start a local one; shut down what we started."""
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (see sweep.pool.connect)
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")  # an embedded Ray: loopback only
    try:
        yield
    finally:
        ray.shutdown()


def _finish(result, allow_skipped: bool) -> None:
    for item in result.skipped:
        typer.echo(f"skipped: {item.file}: {item.error}", err=True)
    typer.echo(result.summary)
    if result.skipped and not allow_skipped:
        typer.echo(f"warning: {len(result.skipped)} file{'s' if len(result.skipped) > 1 else ''} skipped; the "
                   "data set is complete without them (pass --allow-skipped to exit 0)", err=True)
        raise typer.Exit(1)


@prepare_app.command("imagenet")
def imagenet_cmd(
    src: Annotated[str, typer.Option("--src", help="ILSVRC2012 validation folder (flat), or src/<wnid>/*.JPEG.")],
    out: Annotated[str, typer.Option("--out", help="Output directory (must not exist or be empty).")],
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Labels of a flat folder: the devkit's "
                     "ILSVRC2012_validation_ground_truth.txt, Kaggle's LOC_val_solution.csv, or "
                     "'<file> <wnid>' lines. Omit for the class-per-folder layout."),
    ] = None,
    meta: Annotated[
        str | None,
        typer.Option("--meta", help="Synsets. With the devkit ground truth (required): the devkit's "
                     "data/meta.mat (needs scipy) or data/map_clsloc.txt, which map its ILSVRC2012_IDs; a "
                     "sorted list such as LOC_synset_mapping.txt is refused there. Otherwise any synset list "
                     "('n01440764 tench, Tinca tinca' lines): readable names and the full class list."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Data set name in the manifest.")] = "imagenet-val",
    rows_per_shard: RowsOpt = 1000,
    files_per_task: FilesOpt = 32,
    workers: WorkersOpt = None,
    ray_address: AddressOpt = None,
    compression: CompressionOpt = "zstd",
    allow_skipped: SkippedOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Convert ImageNet validation images with torchvision's eval transform (resize 256, centre crop 224).

    Every input is read and checked before Ray starts; decodes in parallel Ray tasks; unreadable
    files are skipped and listed in OUT/report.json. Labels index the sorted WordNet ids
    (torchvision's class order).

    Example (devkit): pixelray prepare imagenet --src ILSVRC2012_img_val --labels
    ILSVRC2012_validation_ground_truth.txt --meta map_clsloc.txt --out data/imagenet-val

    Example (Kaggle): pixelray prepare imagenet --src ILSVRC/Data/CLS-LOC/val --labels
    LOC_val_solution.csv --meta LOC_synset_mapping.txt --out data/imagenet-val
    """
    from pixelray.datasets.imagenet import convert_imagenet, read_imagenet

    try:
        inputs = read_imagenet(src, labels=labels, meta=meta)
        with _ray(ray_address, workers):
            result = convert_imagenet(inputs, out, name=name,
                                      rows_per_shard=rows_per_shard, files_per_task=files_per_task,
                                      compression=compression, progress=progress)
    except ValueError as exc:
        fail(str(exc))
    _finish(result, allow_skipped)


@prepare_app.command("folder")
def folder_cmd(
    src: Annotated[str, typer.Option("--src", help="Root of a class-per-folder tree: src/<class>/<image>.")],
    out: Annotated[str, typer.Option("--out", help="Output directory (must not exist or be empty).")],
    size: Annotated[int, typer.Option("--size", min=1, help="Side of the square centre crop, in pixels.")] = 224,
    resize: Annotated[
        int | None,
        typer.Option("--resize", min=1, help="Resize the short side to this first (default: size * 256 / 224)."),
    ] = None,
    no_resize: Annotated[
        bool, typer.Option("--no-resize", help="Only centre-crop; images smaller than --size are skipped.")
    ] = False,
    name: Annotated[str | None, typer.Option("--name", help="Data set name (default: the folder name).")] = None,
    rows_per_shard: RowsOpt = 1000,
    files_per_task: FilesOpt = 32,
    workers: WorkersOpt = None,
    ray_address: AddressOpt = None,
    compression: CompressionOpt = "zstd",
    allow_skipped: SkippedOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Convert any class-per-folder image tree (classes = sorted folder names, as ImageFolder).

    Example: pixelray prepare folder --src my_images --out data/my_images --size 224
    """
    from pixelray.datasets.folder import Transform, convert_folder

    try:
        if no_resize and resize is not None:
            raise ValueError("--resize and --no-resize exclude each other; give one")
        transform = (Transform(crop=size, resize=None) if no_resize
                     else Transform(crop=size, resize=resize) if resize is not None else Transform.eval(size))
        with _ray(ray_address, workers):
            result = convert_folder(src, out, transform=transform, name=name, rows_per_shard=rows_per_shard,
                                    files_per_task=files_per_task, compression=compression, progress=progress)
    except ValueError as exc:
        fail(str(exc))
    _finish(result, allow_skipped)


@prepare_app.command("synthetic")
def synthetic_cmd(
    out: Annotated[str, typer.Option("--out", help="Output directory (must not exist or be empty).")],
    classes: Annotated[int, typer.Option("--classes", help="Number of classes (2..1000).")] = 10,
    images: Annotated[int, typer.Option("--images", help="Number of images.")] = 1000,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (>= 8).")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same arguments, identical shards.")] = 0,
    rows_per_shard: RowsOpt = 1000,
) -> None:
    """Generate a learnable synthetic data set: coloured, textured shapes on noisy backgrounds.

    Example: pixelray prepare synthetic --out data/synthetic --classes 10 --images 10000 --size 32
    """
    from pixelray.datasets.synthetic import make_synthetic

    try:
        manifest = make_synthetic(out, classes=classes, images=images, size=size, seed=seed,
                                  rows_per_shard=rows_per_shard)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"wrote {manifest.num_images} images ({manifest.num_classes} classes, {size}x{size}) in "
               f"{_count(len(manifest.shards), 'shard')} to {os.path.abspath(out)}")
