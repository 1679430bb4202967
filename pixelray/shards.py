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

import fnmatch
import functools
import hashlib
import json
import os
import posixpath
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pixelray.atomic import TMP_GLOB, write_bytes_atomic
from pixelray.check import check_int, is_int
from pixelray.storage import join_uri

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
MANIFEST_NAME = "manifest.json"
#: ``format`` field of every manifest.
FORMAT = "pixelray-shards"
#: Version of the layout written here; readers accept this version.
FORMAT_VERSION = 1
#: Parquet key-value metadata key holding the image shape (``"H,W,3"``).
_SHAPE_KEY = b"pixelray.image_shape"
_COLUMNS = ("image_id", "label", "image", "source")
_MAX_ROWS_LISTED = 5  # row-level problems listed per file and kind before "... and N more"
_HASH_BLOCK = 8 << 20
_reads = threading.local()  # read_shard calls per thread (see read_count)


def read_count() -> int:
    """How many times :func:`read_shard` was called in this thread so far.

    The worker reports the difference over a unit (each unit runs in one thread), so a
    unit that read its shard twice says 2: the sweep's ``reads`` are counted, not assumed.
    """
    return getattr(_reads, "n", 0)


class ShardError(ValueError):
    """A shard or manifest that cannot be read or is invalid; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it.

    Args:
        file: path relative to the data set root, e.g. ``shard-00000.parquet``.
        rows: number of images in the shard.
        sha256: hex digest of the file's bytes.
        min_id: smallest ``image_id`` in the shard.
        max_id: largest ``image_id`` in the shard.
    """

    file: str
    rows: int
    sha256: str
    min_id: int
    max_id: int

    def __post_init__(self) -> None:
        if not self.file or self.file.startswith("/") or ".." in self.file.split("/"):
            raise ValueError(f"shards.file: {self.file!r} must be a path relative to the data set root")
        if not is_int(self.rows) or self.rows < 1:
            raise ValueError(f"shards.rows: {self.rows!r} for {self.file} must be an integer >= 1")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"shards.sha256: {self.sha256!r} for {self.file} is not a lowercase hex sha256")
        if self.min_id > self.max_id:
            raise ValueError(f"shards.min_id: {self.min_id} > max_id {self.max_id} for {self.file}")


@dataclass(frozen=True)
class Manifest:
    """What a data set holds: image shape, classes and shards.

    Args:
        name: data set name, e.g. ``imagenet-val``.
        height: image height in pixels.
        width: image width in pixels.
        num_images: total number of images (the sum of the shards' rows).
        num_classes: number of classes; labels lie in ``0..num_classes-1``.
        class_names: readable class names, by label.
        class_ids: stable class identifiers by label (WordNet ids for ImageNet,
            class folder names for image folders).
        shards: the shards, in image_id order.
        source: where the data came from: ``imagenet``, ``folder``, ``synthetic``, ...
    """

    name: str
    height: int
    width: int
    num_images: int
    num_classes: int
    class_names: tuple[str, ...]
    class_ids: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "class_ids", tuple(str(c) for c in self.class_ids))
        object.__setattr__(self, "shards", tuple(self.shards))
        for field in ("height", "width", "num_classes"):
            check_int(getattr(self, field), field)
        if self.num_classes > 32767:
            raise ValueError(f"num_classes: {self.num_classes} does not fit the int16 label column (max 32767)")
        for field in ("class_names", "class_ids"):
            if len(getattr(self, field)) != self.num_classes:
                raise ValueError(
                    f"{field}: {len(getattr(self, field))} entries for num_classes {self.num_classes}; "
                    "give one per class"
                )
        if len(set(self.class_ids)) != self.num_classes:
            raise ValueError("class_ids: entries are not unique; give each class its own id")
        total = sum(s.rows for s in self.shards)
        if self.num_images != total:
            raise ValueError(
                f"num_images: {self.num_images} differs from the shards' total of {total} rows"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, 3)."""
        return self.height, self.width, 3

    def to_json(self) -> str:
        """The manifest as ``manifest.json`` text (stable key order, no timestamps)."""
        body: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
        body.update(asdict(self))
        body["channels"] = 3
        return json.dumps(body, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        """Parse ``manifest.json`` text; ShardError naming ``where`` when it is invalid."""
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"format: {body.get('format') if isinstance(body, dict) else body!r} "
                                 f"is not {FORMAT!r}")
            if body.get("version") != FORMAT_VERSION:
                raise ValueError(f"version: {body.get('version')!r} is not supported "
                                 f"(this pixelray reads version {FORMAT_VERSION})")
            shards = tuple(ShardInfo(**s) for s in body["shards"])
            return cls(
                name=str(body["name"]),
                height=body["height"],
                width=body["width"],
                num_images=body["num_images"],
                num_classes=body["num_classes"],
                class_names=tuple(body["class_names"]),
                class_ids=tuple(body["class_ids"]),
                shards=shards,
                source=str(body["source"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ShardError(f"{where}: invalid manifest ({detail}); re-run the conversion") from None


@dataclass(frozen=True)
class ShardBatch:
    """Images of one shard (or a subset of it) as torch tensors.

    Args:
        image_ids: int64 (N,).
        labels: int64 (N,).
        images: uint8 (N, H, W, 3), contiguous and writable.
    """

    image_ids: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


@dataclass(frozen=True)
class ShardExpectation:
    """What a shard must be, from its manifest entry; :func:`read_shard` checks a read against it.

    Args:
        file: the shard's file name in the manifest (named in messages).
        rows: number of rows.
        min_id, max_id: the range of its image ids.
        shape: (H, W, 3) of every image.
        num_classes: labels lie in ``0..num_classes-1``.
        sha256: the file's digest; None skips the (whole-file) hash.
    """

    file: str
    rows: int
    min_id: int
    max_id: int
    shape: tuple[int, int, int]
    num_classes: int
    sha256: str | None = None

    @classmethod
    def of(cls, manifest: Manifest, info: ShardInfo, sha256: bool = False) -> ShardExpectation:
        return cls(info.file, info.rows, info.min_id, info.max_id, manifest.image_shape, manifest.num_classes,
                   info.sha256 if sha256 else None)

    def replace(self, **changes: Any) -> ShardExpectation:
        return replace(self, **changes)

    def mismatches(self, where: str, *, rows: int | None = None, shape: tuple[int, ...] | None = None,
                   ids: np.ndarray | None = None, labels: np.ndarray | None = None) -> list[str]:
        """How a shard's rows, image shape, ids (all of them) and labels differ from this expectation."""
        problems = []
        if rows is not None and rows != self.rows:
            problems.append(f"{where}: {rows} rows, but the manifest says {self.rows}")
        if shape is not None and tuple(shape) != tuple(self.shape):
            problems.append(f"{where}: image shape {_shape_text(shape)} differs from the manifest's "
                            f"{_shape_text(self.shape)}")
        if ids is not None and len(ids):
            low, high = int(ids.min()), int(ids.max())
            if (low, high) != (self.min_id, self.max_id):
                problems.append(f"{where}: image_id range {low}..{high} differs from the manifest's "
                                f"{self.min_id}..{self.max_id}")
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                problems.append(f"{where}: image_id {int(uniq[counts > 1][0])} appears more than once; "
                                "image ids must be unique in the data set")
        if labels is not None and len(labels):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if len(bad):
                problems.append(f"{where}: labels {int(bad.min())}..{int(bad.max())} outside "
                                f"0..{self.num_classes - 1} (num_classes {self.num_classes})")
        return problems


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


# ---------------------------------------------------------------------------- paths


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow filesystem URI."""
    uri = os.fspath(uri)
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ShardError(f"{uri}: cannot open this location ({exc})") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(root: str, name: str) -> str:
    return join_uri(root, name)  # a URI keeps its query (endpoint_override=...)


def load_manifest(root: str) -> Manifest:
    """Read and validate ``manifest.json`` of the data set at ``root`` (local dir or URI)."""
    where = _join(root, MANIFEST_NAME)
    fs, path = _resolve(where)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except (FileNotFoundError, OSError, UnicodeDecodeError) as exc:
        raise ShardError(
            f"{where}: cannot read the manifest ({exc}); is {root} a pixelray data set "
            "(made by `pixelray prepare ...`)?"
        ) from None
    return Manifest.from_json(text, where)


def _resolve_root(root: str) -> tuple[pafs.FileSystem, str]:
    """:func:`_resolve` of a data set root; a URI's once per process (an object store's client is not free)."""
    return _resolve_uri_root(root) if "://" in root else _resolve(root)


@functools.lru_cache(maxsize=64)
def _resolve_uri_root(root: str) -> tuple[pafs.FileSystem, str]:
    return _resolve(root)


def _normal(path: str) -> str:
    return posixpath.normpath(path.replace("\\", "/"))


def shard_uri(root: str, file: str) -> str:
    """Full path or URI of a shard, refused unless it lies inside the data set root.

    The check resolves the path the way the reader does (a URI's percent-escapes decoded,
    ``..`` folded), so that ``..%2F..%2Fetc`` in a manifest cannot reach out of the root.
    """
    uri = _join(root, file)
    fs_root, root_path = _resolve_root(os.fspath(root))
    fs, path = _resolve(uri)
    inside = _normal(root_path).rstrip("/") + "/"
    if type(fs) is not type(fs_root) or not _normal(path).startswith(inside):
        raise ShardError(f"{file}: resolves to {_normal(path)}, outside the data set root {_normal(root_path)}; "
                         f"a manifest may only name files inside its data set (check {_join(root, MANIFEST_NAME)})")
    return uri


def shard_uris(root: str, manifest: Manifest | None = None) -> list[str]:
    """Full path or URI of every shard of the data set at ``root``, in manifest order (see :func:`shard_uri`)."""
    manifest = manifest or load_manifest(root)
    return [shard_uri(root, s.file) for s in manifest.shards]


# ---------------------------------------------------------------------------- reading


def _image_shape(schema: pa.Schema, where: str) -> tuple[int, int, int]:
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
        if _SHAPE_KEY in meta:
            try:
                shape = tuple(int(x) for x in meta[_SHAPE_KEY].decode().split(","))
            except ValueError:
                shape = ()
            if len(shape) != 3 or shape[2] != 3 or shape[0] * shape[1] * 3 != typ.byte_width:
                raise ShardError(f"{where}: image shape metadata {meta[_SHAPE_KEY]!r} does not match "
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


def _int_column(table: pa.Table, name: str, where: str) -> np.ndarray:
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
    fs, path = _resolve(uri)
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
        raise ShardError(f"{uri}: unreadable Parquet ({_one_line(exc)}); the file is truncated or corrupt") from None
    return _int_column(table, "image_id", uri), _int_column(table, "label", uri)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
    fs, path = _resolve(uri)
    columns = ["image_id", "label", "image"]
    try:
        with _open_for_read(fs, path, uri, expect.sha256 if expect else None) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)  # coalesced reads: fewer requests on object stores
            schema = pf.schema_arrow
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ShardError(f"{uri}: missing column(s) {', '.join(missing)} "
                                 f"(columns: {', '.join(schema.names)})")
            shape = _image_shape(schema, uri)
            all_ids = _int_column(pf.read(columns=["image_id"]), "image_id", uri)
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
        raise ShardError(f"{uri}: unreadable Parquet ({_one_line(exc)}); the file is truncated or corrupt, "
                         "re-run the conversion or check the copy") from None
    ids = _int_column(table, "image_id", uri)
    labels = _int_column(table, "label", uri)
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


def _inspect(root: str, info: ShardInfo, manifest: Manifest) -> tuple[str | None, np.ndarray | None]:
    """(first problem or None, image ids) of one shard, from its footer, ids and labels only."""
    try:
        uri = shard_uri(root, info.file)
    except ShardError as exc:
        return str(exc), None
    fs, path = _resolve(uri)
    expect = ShardExpectation.of(manifest, info)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            missing = [c for c in _COLUMNS[:3] if c not in schema.names]
            if missing:
                return f"{uri}: missing column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})", None
            shape = _image_shape(schema, uri)
            table = pf.read(columns=["image_id", "label"])
    except ShardError as exc:
        return str(exc), None
    except FileNotFoundError:
        return f"{uri}: shard not found", None
    except (OSError, pa.ArrowException) as exc:
        return (f"{uri}: unreadable Parquet ({_one_line(exc)}); the file is truncated or corrupt, re-run the "
                "conversion or check the copy"), None
    try:
        ids = _int_column(table, "image_id", uri)
        labels = _int_column(table, "label", uri)
    except ShardError as exc:
        return str(exc), None
    problems = expect.mismatches(uri, rows=table.num_rows, shape=shape, ids=ids, labels=labels)
    return (problems[0] if problems else None), ids


def check_shards(root: str, manifest: Manifest | None = None, threads: int = 8) -> None:
    """Check every shard against the manifest without reading pixels: where it lies, the footer
    (columns, image shape, rows), the ids (range, unique across the data set) and the labels.

    Cheap (two small columns per shard), so a sweep runs it before any work; the pixels
    and the sha256 are checked by the worker that reads the shard.

    Raises:
        ShardError: the first problem, in manifest order, naming the shard.
    """
    manifest = manifest or load_manifest(root)
    with ThreadPoolExecutor(max(1, min(threads, len(manifest.shards)))) as pool:
        found = list(pool.map(lambda info: _inspect(root, info, manifest), manifest.shards))
    for problem, _ in found:
        if problem:
            raise ShardError(problem)
    ranges = sorted((info.min_id, info.max_id) for info in manifest.shards)
    if all(prev[1] < cur[0] for prev, cur in zip(ranges, ranges[1:], strict=False)):
        return  # disjoint ranges (checked above against the ids) cannot share an id
    ids = np.concatenate([f[1] for f in found])
    which = np.concatenate([np.full(len(f[1]), i) for i, f in enumerate(found)])
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        first, second = order[dup[0]], order[dup[0] + 1]
        raise ShardError(f"{manifest.shards[which[second]].file}: image_id {int(ids[second])} is also in "
                         f"{manifest.shards[which[first]].file}; image ids must be unique across the data set "
                         "(`pixelray data check` lists them all)")


# ---------------------------------------------------------------------------- writing


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_temp(name: str) -> bool:
    """A temporary file of an atomic write (this version's ``.NAME.tmp-XXXX`` or the older ``.NAME.PID.tmp``)."""
    return fnmatch.fnmatch(name, TMP_GLOB) or (name.startswith(".") and name.endswith(".tmp"))


def _sha256_file(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(_HASH_BLOCK):
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
            if _is_temp(name):
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
        ).replace_schema_metadata({_SHAPE_KEY: f"{self.height},{self.width},3".encode()})
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


# ---------------------------------------------------------------------------- validation


def _rows_text(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_ROWS_LISTED])
    more = f" and {len(rows) - _MAX_ROWS_LISTED} more" if len(rows) > _MAX_ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _check_shard(root: str, info: ShardInfo, manifest: Manifest, fs: pafs.FileSystem,
                 ) -> tuple[list[str], np.ndarray | None]:
    """Problems with one shard, and its image_ids (None when unreadable)."""
    try:
        uri = shard_uri(root, info.file)
    except ShardError as exc:
        return [str(exc)], None
    path = _resolve(uri)[1]
    name = info.file
    problems: list[str] = []
    if fs.get_file_info(path).type != pafs.FileType.File:
        return [f"{name}: listed in {MANIFEST_NAME} but missing"], None
    digest = _sha256_file(fs, path)
    if digest != info.sha256:
        problems.append(f"{name}: checksum mismatch (sha256 {digest[:12]}... differs from the manifest's "
                        f"{info.sha256[:12]}...); the file changed after conversion or is corrupt")
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)  # coalesced reads: fewer requests on object stores
            schema = pf.schema_arrow
            table = pf.read(use_threads=True)
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"{name}: unreadable Parquet ({exc}); the file is truncated or corrupt, "
                        "re-run the conversion")
        return problems, None
    missing = [c for c in _COLUMNS if c not in schema.names]
    if missing:
        problems.append(f"{name}: missing column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})")
    expected = {"image_id": pa.int64(), "label": pa.int16(), "source": pa.string()}
    for col, typ in expected.items():
        if col in schema.names and schema.field(col).type != typ:
            problems.append(f"{name}: column '{col}' is {schema.field(col).type}; expected {typ}")
    if "image" in schema.names:
        try:
            shape = _image_shape(schema, name)
            if shape != manifest.image_shape:
                problems.append(f"{name}: image shape {'x'.join(map(str, shape))} differs from the "
                                f"manifest's {'x'.join(map(str, manifest.image_shape))}")
        except ShardError as exc:
            problems.append(str(exc))
        nulls = np.flatnonzero(table.column("image").is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            problems.append(f"{name}: {_rows_text(nulls)}: image is null")
    if table.num_rows != info.rows:
        problems.append(f"{name}: {table.num_rows} rows, but {MANIFEST_NAME} says {info.rows}")
    ids = None
    if "image_id" in schema.names and pa.types.is_integer(schema.field("image_id").type):
        col = table.column("image_id")
        nulls = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            problems.append(f"{name}: {_rows_text(nulls)}: image_id is null")
        ids = col.fill_null(-1).to_numpy().astype(np.int64)
        if len(ids) and (ids.min() != info.min_id or ids.max() != info.max_id):
            problems.append(f"{name}: image_id range {ids.min()}..{ids.max()} differs from the manifest's "
                            f"{info.min_id}..{info.max_id}")
    if "label" in schema.names and pa.types.is_integer(schema.field("label").type):
        col = table.column("label")
        labels = col.fill_null(-1).to_numpy().astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
        if len(bad):
            problems.append(f"{name}: {_rows_text(bad)}: label {int(labels[bad[0]])}"
                            f"{' (and others)' if len(set(labels[bad].tolist())) > 1 else ''} is outside "
                            f"0..{manifest.num_classes - 1} (num_classes {manifest.num_classes})")
    return problems, ids


def check_dataset(root: str) -> list[str]:
    """Validate a data set: manifest, schema, shapes, labels, unique ids, checksums, readability.

    Returns:
        Human-readable problems, each naming the file (and rows where relevant);
        an empty list when the data set is sound.
    """
    try:
        manifest = load_manifest(root)
    except ShardError as exc:
        return [str(exc)]
    fs, root_path = _resolve(root)
    problems: list[str] = []
    id_arrays: list[tuple[str, np.ndarray]] = []
    for info in manifest.shards:
        found, ids = _check_shard(root, info, manifest, fs)
        problems += found
        if ids is not None:
            id_arrays.append((info.file, ids))
    if id_arrays:
        all_ids = np.concatenate([ids for _, ids in id_arrays])
        files = np.concatenate([np.full(len(ids), i) for i, (_, ids) in enumerate(id_arrays)])
        rows = np.concatenate([np.arange(len(ids)) for _, ids in id_arrays])
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1]) + 1
        reported = 0
        for pos in dup:
            if reported == _MAX_ROWS_LISTED:
                problems.append(f"... and {len(dup) - reported} more duplicate image_ids")
                break
            first, other = order[pos - 1], order[pos]
            problems.append(
                f"{id_arrays[files[other]][0]}: row {rows[other]}: image_id {sorted_ids[pos]} duplicates "
                f"{id_arrays[files[first]][0]} row {rows[first]}; image ids must be unique"
            )
            reported += 1
    try:
        listed = {s.file for s in manifest.shards}
        for entry in fs.get_file_info(pafs.FileSelector(root_path)):
            base = posixpath.basename(entry.path.replace("\\", "/"))
            if base.endswith(".parquet") and base not in listed:
                problems.append(f"{base}: not listed in {MANIFEST_NAME}; remove it or re-run the conversion")
            elif _is_temp(base):
                problems.append(f"{base}: leftover temporary file from an interrupted run; delete it")
    except OSError:
        pass  # listing is optional (some object stores forbid it)
    return problems
