"""Shard read throughput into torch beside a raw ``pyarrow.parquet.read_table`` of the same files.

The goal (issue 3): ``read_shard`` delivers uint8 torch tensors at >= 0.8 of the rate at which
pyarrow alone reads the same Parquet files into an Arrow table. Builds its own synthetic data set
(default 2,000 images at 224x224, 500 per shard) in a temporary directory, reads every shard once
to warm the page cache, then times full passes over all shards, taking turns: raw ``pq.read_table(path)`` (all
columns) and ``read_shard(path)`` (ids, labels, images as tensors), plus a 10% subset read. Prints
one JSON line: median seconds per pass, images/s and GB/s of pixels for each, and the ratio.

It also prices the checks against the manifest (issue 12): a read checked against its manifest
entry (rows, shape, ids, labels), a read that also hashes the whole file (sha256), and the
driver's check of every shard before a sweep (footer, ids and labels). Each is reported as a
share of the time a sweep spends on the same images: ``--cells`` cells plus the clean pass
through one model (``--model``, random init, ``--batch``), with the shard read twice (clean
and cells phase), hashed once (a worker remembers the shards it has hashed) and checked once
by the driver.

    python benchmarks/shards.py                        # 2,000 images, 224x224, zstd
    python benchmarks/shards.py --compression none --images 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pixelray.datasets.synthetic import make_synthetic
from pixelray.models import load_model
from pixelray.shards import ShardExpectation, ShardWriter, check_shards, load_manifest, read_shard, shard_uris


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function over ``repeats`` runs, after one warm-up run each.

    The functions take turns within every repeat, so a machine whose load drifts during the
    run slows every side alike and the ratios stay fair.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _recompress(src: str, dst: str, compression: str, rows_per_shard: int) -> None:
    """Rewrite the synthetic set with another codec (make_synthetic uses the writer's default)."""
    m = load_manifest(src)
    with ShardWriter(dst, name=m.name, height=m.height, width=m.width, class_names=m.class_names,
                     class_ids=m.class_ids, source=m.source, rows_per_shard=rows_per_shard,
                     compression=compression) as writer:
        for uri in shard_uris(src):
            b = read_shard(uri)
            sources = pq.read_table(uri, columns=["source"]).column(0).to_pylist()
            writer.add(b.image_ids, b.labels, b.images, sources)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the data set")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--rows-per-shard", type=int, default=500, help="images per shard")
    parser.add_argument("--compression", default="zstd", help="Parquet codec: zstd, lz4, snappy, none")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes over all shards")
    parser.add_argument("--dir", default=None, help="where to build the data (default: a temp dir)")
    parser.add_argument("--model", default="squeezenet1_1", help="the model that prices a sweep's compute")
    parser.add_argument("--cells", type=int, default=25, help="cells of the priced sweep (plus the clean pass)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the priced sweep's forward passes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        root = os.path.join(tmp, "synthetic")
        make_synthetic(root, classes=10, images=args.images, size=args.size, seed=0,
                       rows_per_shard=args.rows_per_shard)
        if args.compression != "zstd":
            other = os.path.join(tmp, f"synthetic-{args.compression}")
            _recompress(root, other, args.compression, args.rows_per_shard)
            root = other
        build_s = time.perf_counter() - start
        uris = shard_uris(root)
        manifest = load_manifest(root)
        pixel_bytes = manifest.num_images * manifest.height * manifest.width * 3
        file_bytes = sum(os.path.getsize(u) for u in uris)

        def raw() -> None:
            for uri in uris:
                pq.read_table(uri)

        def ours() -> None:
            for uri in uris:
                batch = read_shard(uri)
                assert batch.images.dtype == torch.uint8

        subset_ids = np.arange(0, manifest.num_images, 10)

        def subset() -> None:
            for uri in uris:
                read_shard(uri, image_ids=subset_ids)

        basic = [ShardExpectation.of(manifest, info) for info in manifest.shards]
        hashed = [ShardExpectation.of(manifest, info, sha256=True) for info in manifest.shards]

        def checked() -> None:
            for uri, expect in zip(uris, basic, strict=True):
                read_shard(uri, expect=expect)

        def sha256() -> None:
            for uri, expect in zip(uris, hashed, strict=True):
                read_shard(uri, expect=expect)

        medians = timed({"raw": raw, "ours": ours, "subset": subset, "checked": checked, "sha256": sha256,
                         "driver_check": lambda: check_shards(root)}, args.repeats)
        raw_s, ours_s, subset_s = medians["raw"], medians["ours"], medians["subset"]
        forward_s = _forward_seconds(args.model, read_shard(uris[0]).images, manifest.num_classes, args.batch)
        per_image_s = forward_s / manifest.shards[0].rows

    n = manifest.num_images
    result = {
        "benchmark": "shards",
        "images": n,
        "size": args.size,
        "shards": len(uris),
        "rows_per_shard": args.rows_per_shard,
        "compression": args.compression,
        "file_mb": round(file_bytes / 1e6, 1),
        "pixel_mb": round(pixel_bytes / 1e6, 1),
        "raw_read_table_s": round(raw_s, 4),
        "raw_images_per_s": round(n / raw_s),
        "raw_gb_per_s": round(pixel_bytes / raw_s / 1e9, 3),
        "read_shard_s": round(ours_s, 4),
        "read_shard_images_per_s": round(n / ours_s),
        "read_shard_gb_per_s": round(pixel_bytes / ours_s / 1e9, 3),
        "ratio_vs_raw": round(raw_s / ours_s, 3),
        "subset_10pct_s": round(subset_s, 4),
        "checked_read_s": round(medians["checked"], 4),
        "sha256_read_s": round(medians["sha256"], 4),
        "driver_check_s": round(medians["driver_check"], 4),
        **_shares(medians, per_image_s * n * (args.cells + 1)),
        "priced_sweep": f"{args.model}, {args.cells} cells + clean, batch {args.batch}, {n} images",
        "priced_sweep_s": round(per_image_s * n * (args.cells + 1), 2),
        "build_s": round(build_s, 1),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
    }
    print(json.dumps(result))
    return result


def _forward_seconds(model_name: str, images: torch.Tensor, num_classes: int, batch: int) -> float:
    """Median seconds of one batched forward pass over ``images`` (the model in eval mode, channels_last)."""
    model = load_model(model_name, None, num_classes=num_classes).to(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                model(images[start:start + batch]).argmax(1)

    return timed({"forward": forward}, 3)["forward"]


def _shares(medians: dict[str, float], sweep_s: float) -> dict[str, float]:
    """The checks' cost as a share of a sweep over the same images (two reads, one hash, one driver check)."""
    basic = 2 * max(0.0, medians["checked"] - medians["ours"])
    sha = max(0.0, medians["sha256"] - medians["checked"])
    return {
        "checks_share_of_sweep": round((basic + medians["driver_check"]) / sweep_s, 5),
        "sha256_share_of_sweep": round(sha / sweep_s, 5),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
