"""Writing a data set: fixed-size shards and the manifest, each written atomically."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pixelray.core.check import check_int
from pixelray.shards.format import HASH_BLOCK, MANIFEST_NAME, SHAPE_KEY, Manifest, ShardInfo
from pixelray.store.atomic import TMP_GLOB, write_bytes_atomic


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def is_temp(name: str) -> bool:
    """A temporary file of an atomic write (this version's ``.NAME.tmp-XXXX`` or the older ``.NAME.PID.tmp``)."""
    return fnmatch.fnmatch(name, TMP_GLOB) or (name.startswith(".") and name.endswith(".tmp"))


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Write a data set: fixed-size shards, each atomically, then ``manifest.json``.

    Use it as a context manager. Rows go in through :meth:`add` in any batch size;
    every ``rows_per_shard`` rows become one shard, written to a temporary file and
    renamed into place. :meth:`close` writes the last, shorter shard and then the
    manifest, so a directory with a manifest is complete. If the block raises, the
    files written so far are removed again: a failed run leaves no output.

    Args:
        out_dir: local directory to create (it must not exist or be empty).
        name: data set name.
        height: image height.
        width: image width.
        class_names: readable class names, by label.
        class_ids: stable class identifiers (default: ``class_names``).
        source: origin of the data (``imagenet``, ``folder``, ``synthetic``, ...).
        rows_per_shard: images per shard (the last shard may hold fewer).
        compression: Parquet compression codec (``zstd``, ``lz4``, ``snappy``, ``none``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        name: str,
        height: int,
        width: int,
        class_names: Sequence[str],
        class_ids: Sequence[str] | None = None,
        source: str,
        rows_per_shard: int = 1000,
        compression: str = "zstd",
    ) -> None:
        check_int(rows_per_shard, "rows_per_shard")
        check_int(height, "height")
        check_int(width, "width")
        class_names = tuple(str(c) for c in class_names)
        class_ids = class_names if class_ids is None else tuple(str(c) for c in class_ids)
        if not class_names:
            raise ValueError("class_names: empty; give at least one class")
        if len(class_ids) != len(class_names):
            raise ValueError(f"class_ids: {len(class_ids)} entries for {len(class_names)} class_names; "
                             "give one id per class")
        if len(set(class_ids)) != len(class_ids):
            raise ValueError("class_ids: entries are not unique; give each class its own id")
        if len(class_names) > 32767:
            raise ValueError(f"class_names: {len(class_names)} classes do not fit the int16 label column "
                             "(max 32767)")
        if compression.lower() not in ("zstd", "lz4", "snappy", "gzip", "brotli", "none"):
            raise ValueError(f"compression: {compression!r} is unknown; use zstd, lz4, snappy, gzip, "
                             "brotli or none")
        if "://" in os.fspath(out_dir):
            raise ValueError(f"out_dir: {os.fspath(out_dir)} is a URI; ShardWriter writes a local directory "
                             "(write locally, then copy it, e.g. with `aws s3 sync`)")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out_dir) and (not os.path.isdir(self.out_dir) or os.listdir(self.out_dir)):
            raise ValueError(f"out_dir: {self.out_dir} exists and is not an empty directory; "
                             "choose a new directory or remove the old one")
        self._created_dir = not os.path.exists(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.name, self.source = str(name), str(source)
        self.height, self.width = height, width
        self.class_names, self.class_ids = class_names, class_ids
        self.rows_per_shard = rows_per_shard
        self.compression = compression.lower()
        self._shape = (height, width, 3)
        self._buf_images = np.empty((rows_per_shard, *self._shape), dtype=np.uint8)
        self._buf_ids = np.empty(rows_per_shard, dtype=np.int64)
        self._buf_labels = np.empty(rows_per_shard, dtype=np.int16)
        self._buf_sources: list[str] = []
        self._fill = 0
        self._seen_ids: set[int] = set()
        self._shards: list[ShardInfo] = []
        self._written: list[str] = []
        self._manifest: Manifest | None = None
        self._closed = False

    # -- public

    def add(self, image_ids: Any, labels: Any, images: Any, sources: Sequence[str]) -> None:
        """Append rows; arrays or tensors of any batch size (images uint8 (N, H, W, 3))."""
        if self._closed:
            raise ValueError(f"{self.out_dir}: the writer is closed; open a new ShardWriter")
        ids = _as_numpy(image_ids, "image_ids").reshape(-1)
        labs = _as_numpy(labels, "labels").reshape(-1)
        imgs = _as_numpy(images, "images")
        srcs = [str(s) for s in sources]
        n = len(ids)
        if not (len(labs) == len(srcs) == n and len(imgs) == n):
            raise ValueError(f"add: image_ids ({n}), labels ({len(labs)}), images ({len(imgs)}) and "
                             f"sources ({len(srcs)}) must have the same length")
        if imgs.dtype != np.uint8 or tuple(imgs.shape[1:]) != self._shape:
            raise ValueError(f"images: {imgs.dtype} {tuple(imgs.shape)} is invalid; expected uint8 "
                             f"(N, {self.height}, {self.width}, 3)")
        if n == 0:
            return
        if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(labs.dtype, np.integer):
            raise ValueError(f"image_ids/labels: dtypes {ids.dtype}/{labs.dtype} are invalid; use integers")
        bad = np.flatnonzero((labs < 0) | (labs >= len(self.class_names)))
        if len(bad):
            raise ValueError(f"labels: {int(labs[bad[0]])} (image_id {int(ids[bad[0]])}) is outside "
                             f"0..{len(self.class_names) - 1}; labels index class_names")
        ids = ids.astype(np.int64)
        new = set(ids.tolist())
        if len(new) != n or not self._seen_ids.isdisjoint(new):
            uniq, counts = np.unique(ids, return_counts=True)
            again = sorted(new & self._seen_ids)
            dup = int(uniq[counts > 1][0]) if (counts > 1).any() else again[0]
            raise ValueError(f"image_ids: {dup} appears more than once; image ids must be unique "
                             "in the data set")
        self._seen_ids |= new
        start = 0
        while start < n:
            take = min(n - start, self.rows_per_shard - self._fill)
            sl = slice(self._fill, self._fill + take)
            self._buf_ids[sl] = ids[start:start + take]
            self._buf_labels[sl] = labs[start:start + take]
            self._buf_images[sl] = imgs[start:start + take]
            self._buf_sources.extend(srcs[start:start + take])
            self._fill += take
            start += take
            if self._fill == self.rows_per_shard:
                self._flush()

    def close(self) -> Manifest:
        """Write the last shard and ``manifest.json``; return the manifest."""
        if self._manifest is not None:
            return self._manifest
        self._closed = True
        if self._fill:
            self._flush()
        if not self._shards:
            raise ValueError(f"{self.out_dir}: no images were added; a data set needs at least one image")
        manifest = Manifest(
            name=self.name,
            height=self.height,
            width=self.width,
            num_images=sum(s.rows for s in self._shards),
            num_classes=len(self.class_names),
            class_names=self.class_names,
            class_ids=self.class_ids,
            shards=tuple(self._shards),
            source=self.source,
        )
        self._write_atomic(MANIFEST_NAME, manifest.to_json().encode("utf-8"))
        self._manifest = manifest
        return manifest

    def add_file(self, name: str, data: bytes) -> None:
        """Write an extra file (e.g. a report) beside the shards, atomically; :meth:`abort` removes it."""
        if self._closed:
            raise ValueError(f"{self.out_dir}: the writer is closed; write {name} before close()")
        if name == MANIFEST_NAME or "/" in name or name.startswith(".") or name.endswith(".parquet"):
            raise ValueError(f"name: {name!r} is reserved or not a plain file name; pick another")
        self._write_atomic(name, data)
        if name not in self._written:
            self._written.append(name)

    def abort(self) -> None:
        """Remove every file this writer wrote (and the directory if it made it and it is empty)."""
        self._closed = True
        for name in self._written + [MANIFEST_NAME]:
            path = os.path.join(self.out_dir, name)
            if name == MANIFEST_NAME and self._manifest is None:
                continue
            if os.path.exists(path):
                os.remove(path)
        for name in os.listdir(self.out_dir) if os.path.isdir(self.out_dir) else ():
            if is_temp(name):
                os.remove(os.path.join(self.out_dir, name))
        self._written, self._shards, self._manifest = [], [], None
        if self._created_dir and os.path.isdir(self.out_dir) and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise

    # -- private

    def _flush(self) -> None:
        n = self._fill
        row_bytes = self.height * self.width * 3
        pixels = pa.py_buffer(self._buf_images[:n].reshape(-1))
        table = pa.table(
            {
                "image_id": pa.array(self._buf_ids[:n], pa.int64()),
                "label": pa.array(self._buf_labels[:n], pa.int16()),
                "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pixels]),
                "source": pa.array(self._buf_sources, pa.string()),
            }
        ).replace_schema_metadata({SHAPE_KEY: f"{self.height},{self.width},3".encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            row_group_size=n,  # one row group: the image column decodes into one buffer
            compression=self.compression,
            use_dictionary=["source"],
            write_statistics=["image_id", "label"],
        )
        data = sink.getvalue()
        name = f"shard-{len(self._shards):05d}.parquet"
        self._write_atomic(name, data)
        self._written.append(name)
        self._shards.append(ShardInfo(
            file=name,
            rows=n,
            sha256=hashlib.sha256(data).hexdigest(),
            min_id=int(self._buf_ids[:n].min()),
            max_id=int(self._buf_ids[:n].max()),
        ))
        self._fill = 0
        self._buf_sources = []

    def _write_atomic(self, name: str, data: bytes | pa.Buffer) -> None:
        write_bytes_atomic(data, os.path.join(self.out_dir, name))
