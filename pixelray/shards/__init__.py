"""The shard format: Parquet files of images, written atomically, read zero-copy into torch.

A data set is a directory (local, or any pyarrow filesystem URI such as ``s3://``)
holding fixed-size Parquet shards and a ``manifest.json``. Every shard has the
columns ``image_id`` (int64, unique across the data set), ``label`` (int16),
``image`` (uint8 H x W x 3) and ``source`` (the original file name). Images are
stored as ``fixed_size_binary(H * W * 3)``, one row group per shard, which
Parquet decodes into one contiguous buffer that torch can use without a copy;
Arrow's ``fixed_shape_tensor`` is read as well. The manifest lists the shape,
the classes and each shard's row count, id range and sha256.

Example:
    >>> import numpy as np, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "tiny")
    >>> with ShardWriter(out, name="tiny", height=2, width=2, class_names=["a", "b"],
    ...                  source="example", rows_per_shard=2) as writer:
    ...     writer.add([0, 1, 2], [0, 1, 1], np.zeros((3, 2, 2, 3), np.uint8), ["x", "y", "z"])
    >>> [s.rows for s in load_manifest(out).shards]
    [2, 1]
    >>> read_shard(shard_uris(out)[0], image_ids=[1]).labels.tolist()
    [1]
"""


from __future__ import annotations

from pixelray.shards.check import check_dataset, check_shards
from pixelray.shards.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ShardBatch,
    ShardError,
    ShardExpectation,
    ShardInfo,
)
from pixelray.shards.paths import load_manifest, shard_uri, shard_uris
from pixelray.shards.read import read_count, read_labels, read_shard
from pixelray.shards.write import ShardWriter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ShardBatch",
    "ShardError",
    "ShardExpectation",
    "ShardInfo",
    "ShardWriter",
    "check_dataset",
    "check_shards",
    "load_manifest",
    "read_labels",
    "read_count",
    "read_shard",
    "shard_uri",
    "shard_uris",
]

#: Name of the manifest file at a data set's root.
