"""Reading shards zero-copy into torch: one contiguous uint8 buffer per shard, checked against the manifest."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pixelray.errors import one_line
from pixelray.shards.format import SHAPE_KEY, ShardBatch, ShardError, ShardExpectation
from pixelray.shards.paths import resolve

_reads = threading.local()  # read_shard calls per thread (see read_count)


def read_count() -> int:
    """How many times :func:`read_shard` was called in this thread so far.

    The worker reports the difference over a unit (each unit runs in one thread), so a
    unit that read its shard twice says 2: the sweep's ``reads`` are counted, not assumed.
    """
    return getattr(_reads, "n", 0)




def image_shape(schema: pa.Schema, where: str) -> tuple[int, int, int]:
    """(H, W, 3) of the ``image`` column, from its type or the file's metadata."""
    idx = schema.get_field_index("image")
    if idx < 0:
        raise ShardError(f"{where}: no 'image' column (columns: {', '.join(schema.names)})")
    typ = schema.field(idx).type
    if isinstance(typ, pa.FixedShapeTensorType):
        shape = tuple(typ.shape)
        if typ.value_type != pa.uint8() or len(shape) != 3 or shape[2] != 3:
            raise ShardError(f"{where}: image tensor is {typ.value_type} {list(shape)}; expected uint8 [H, W, 3]")
        if typ.permutation not in (None, [0, 1, 2]):
            raise ShardError(f"{where}: image tensor permutation {typ.permutation} is not supported; "
                             "store images in H, W, C order")
        return shape  # type: ignore[return-value]
    if pa.types.is_fixed_size_binary(typ):
        meta = schema.metadata or {}
        if SHAPE_KEY in meta:
            try:
                shape = tuple(int(x) for x in meta[SHAPE_KEY].decode().split(","))
            except ValueError:
                shape = ()
            if len(shape) != 3 or shape[2] != 3 or shape[0] * shape[1] * 3 != typ.byte_width:
                raise ShardError(f"{where}: image shape metadata {meta[SHAPE_KEY]!r} does not match "
                                 f"{typ.byte_width} bytes per image")
            return shape  # type: ignore[return-value]
        side = int(round((typ.byte_width / 3) ** 0.5))
        if side * side * 3 == typ.byte_width:
            return side, side, 3
        raise ShardError(f"{where}: image is {typ.byte_width} bytes per row with no shape metadata; "
                         f"cannot tell H from W")
    raise ShardError(f"{where}: image column type {typ} is not fixed_size_binary(H*W*3) or a uint8 "
                     "fixed_shape_tensor")


def _image_views(column: pa.ChunkedArray, shape: tuple[int, int, int], where: str) -> list[torch.Tensor]:
    """Zero-copy uint8 (n, H, W, 3) tensors over each chunk's pixel buffer."""
    row_bytes = shape[0] * shape[1] * shape[2]
    views = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ShardError(f"{where}: {chunk.null_count} null images; every row needs an image")
        n = len(chunk)
        if isinstance(chunk, pa.ExtensionArray):
            flat = chunk.storage.flatten()
        else:
            flat = pa.Array.from_buffers(pa.uint8(), n * row_bytes, [None, chunk.buffers()[1]],
                                         offset=chunk.offset * row_bytes)
        # DLPack shares the Arrow buffer (kept alive by the tensor) and gives a writable tensor.
        views.append(torch.from_dlpack(flat).view(n, *shape))
    return views


def _gather(views: list[torch.Tensor], keep: np.ndarray | None, shape: tuple[int, int, int],
            pin_memory: bool = False) -> torch.Tensor:
    """Rows ``keep`` (sorted; None = all) of the chunk views as one tensor, copying at most once
    (into page-locked memory with ``pin_memory``: the one copy lands where a GPU copy can start from)."""
    total = sum(len(v) for v in views)
    if keep is None or len(keep) == total:
        if len(views) == 1 and not pin_memory:
            return views[0]  # zero-copy
        keep = None
    out = torch.empty((total if keep is None else len(keep), *shape), dtype=torch.uint8, pin_memory=pin_memory)
    dest = out.numpy().reshape(len(out), -1)
    start, pos = 0, 0
    for view in views:
        src = view.numpy().reshape(len(view), -1)
        if keep is None:
            rows = np.arange(len(view))
        else:
            lo, hi = np.searchsorted(keep, [start, start + len(view)])
            rows = keep[lo:hi] - start
        np.take(src, rows, axis=0, out=dest[pos:pos + len(rows)])  # row gather straight into the output
        start, pos = start + len(view), pos + len(rows)
    return out


def int_column(table: pa.Table, name: str, where: str) -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise ShardError(f"{where}: column '{name}' is {col.type}; expected an integer type")
    if col.null_count:
        raise ShardError(f"{where}: column '{name}' has {col.null_count} nulls")
    return col.to_numpy().astype(np.int64, copy=False)


def read_labels(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids, labels) of one shard, int64, without reading its images (for planning splits).

    Raises:
        ShardError: the file is missing, unreadable or lacks the columns.
    """
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in ("image_id", "label") if c not in pf.schema_arrow.names]
            if missing:
                raise ShardError(f"{uri}: missing column(s) {', '.join(missing)}")
            table = pf.read(columns=["image_id", "label"])
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(f"{uri}: shard not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{uri}: unreadable Parquet ({one_line(exc)}); the file is truncated or corrupt") from None
    return int_column(table, "image_id", uri), int_column(table, "label", uri)


def _open_for_read(fs: pafs.FileSystem, path: str, uri: str, sha256: str | None):
    """The shard's bytes as a readable file; with ``sha256``, read whole and checked first."""
    if sha256 is None:
        return fs.open_input_file(path)
    with fs.open_input_file(path) as f:
        data = f.read_buffer()
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    if digest != sha256:
        raise ShardError(f"{uri}: sha256 {digest[:12]}... differs from the manifest's {sha256[:12]}...; the file "
                         "changed after conversion or is corrupt (`pixelray data check` lists every problem)")
    return pa.BufferReader(data)


def read_shard(
    uri: str, image_ids: Sequence[int] | None = None, expect: ShardExpectation | None = None,
    pin_memory: bool = False,
) -> ShardBatch:
    """Read one shard into torch tensors, copying the pixels at most once.

    A shard written by :class:`ShardWriter` (one row group) is read without copying
    the pixels: the tensor shares the buffer Parquet decoded into (and keeps it alive).

    Args:
        uri: local path or pyarrow filesystem URI (``s3://...``, ``file://...``) of a shard.
        image_ids: keep only these ids (ids not in this shard are ignored); rows keep
            the shard's order. ``None`` reads every row.
        expect: the shard's manifest entry; the read is checked against it (rows, image
            shape, id range and uniqueness, labels, and the whole file's sha256 when it
            has one) and refused with a one-line message naming the shard.

    Raises:
        ShardError: the file is missing, unreadable, not a pixelray shard, or not what
            ``expect`` says.
        pin_memory: put the pixels in page-locked memory (one copy; needs CUDA), so that a
            ``.to("cuda", non_blocking=True)`` copy is asynchronous.
    """
    _reads.n = read_count() + 1
    fs, path = resolve(uri)
    columns = ["image_id", "label", "image"]
    try:
        with _open_for_read(fs, path, uri, expect.sha256 if expect else None) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)  # coalesced reads: fewer requests on object stores
            schema = pf.schema_arrow
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ShardError(f"{uri}: missing column(s) {', '.join(missing)} "
                                 f"(columns: {', '.join(schema.names)})")
            shape = image_shape(schema, uri)
            all_ids = int_column(pf.read(columns=["image_id"]), "image_id", uri)
            if expect is not None:
                problems = expect.mismatches(uri, rows=pf.metadata.num_rows, shape=shape, ids=all_ids)
                if problems:
                    raise ShardError(problems[0])
            if image_ids is None:
                table = pf.read(columns=columns, use_threads=True)
                keep = None
            else:
                wanted = np.asarray(image_ids, dtype=np.int64).reshape(-1)
                rows = np.flatnonzero(np.isin(all_ids, wanted))
                sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])
                starts = np.concatenate([[0], np.cumsum(sizes)])
                group = np.searchsorted(starts, rows, side="right") - 1
                groups = np.unique(group)
                # where each chosen row lands in the table made of the chosen row groups only
                base = np.zeros(len(sizes), dtype=np.int64)
                base[groups] = np.concatenate([[0], np.cumsum(sizes[groups])[:-1]])
                keep = rows - starts[group] + base[group]
                table = pf.read_row_groups(groups.tolist(), columns=columns, use_threads=True) if len(rows) \
                    else schema.empty_table().select(columns)
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(f"{uri}: shard not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{uri}: unreadable Parquet ({one_line(exc)}); the file is truncated or corrupt, "
                         "re-run the conversion or check the copy") from None
    ids = int_column(table, "image_id", uri)
    labels = int_column(table, "label", uri)
    if expect is not None:
        problems = expect.mismatches(uri, labels=labels)
        if problems:
            raise ShardError(problems[0])
    views = _image_views(table.column("image"), shape, uri)
    if keep is not None:
        ids, labels = ids[keep], labels[keep]
    images = _gather(views, keep, shape, pin_memory)
    return ShardBatch(
        image_ids=torch.tensor(ids, dtype=torch.int64, pin_memory=pin_memory),
        labels=torch.tensor(labels, dtype=torch.int64, pin_memory=pin_memory),
        images=images,
    )
