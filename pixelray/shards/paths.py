"""Where a data set's files are: its manifest, its shards' URIs (kept inside the data set's root)."""

from __future__ import annotations

import functools
import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from pixelray.shards.format import MANIFEST_NAME, Manifest, ShardError
from pixelray.store.storage import join_uri


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
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
    fs, path = resolve(where)
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
    """:func:`resolve` of a data set root; a URI's once per process (an object store's client is not free)."""
    return _resolve_uri_root(root) if "://" in root else resolve(root)


@functools.lru_cache(maxsize=64)
def _resolve_uri_root(root: str) -> tuple[pafs.FileSystem, str]:
    return resolve(root)


def _normal(path: str) -> str:
    return posixpath.normpath(path.replace("\\", "/"))


def shard_uri(root: str, file: str) -> str:
    """Full path or URI of a shard, refused unless it lies inside the data set root.

    The check resolves the path the way the reader does (a URI's percent-escapes decoded,
    ``..`` folded), so that ``..%2F..%2Fetc`` in a manifest cannot reach out of the root.
    """
    uri = _join(root, file)
    fs_root, root_path = _resolve_root(os.fspath(root))
    fs, path = resolve(uri)
    inside = _normal(root_path).rstrip("/") + "/"
    if type(fs) is not type(fs_root) or not _normal(path).startswith(inside):
        raise ShardError(f"{file}: resolves to {_normal(path)}, outside the data set root {_normal(root_path)}; "
                         f"a manifest may only name files inside its data set (check {_join(root, MANIFEST_NAME)})")
    return uri


def shard_uris(root: str, manifest: Manifest | None = None) -> list[str]:
    """Full path or URI of every shard of the data set at ``root``, in manifest order (see :func:`shard_uri`)."""
    manifest = manifest or load_manifest(root)
    return [shard_uri(root, s.file) for s in manifest.shards]
