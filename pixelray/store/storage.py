"""Where files live: a local path, or a key in an object store (any pyarrow filesystem URI, e.g. ``s3://``).

A :class:`Location` reads and writes whole files, atomically on both:

- on a local disk, through :mod:`pixelray.store.atomic` (temp file, fsync, rename);
- on an object store, where a rename is a copy and a failed upload can still publish what
  it sent (pyarrow completes a multipart upload when its stream closes, even on an
  error): the bytes go to a temporary key ``.NAME.tmp-XXXX`` first, then a server-side
  copy (S3 CopyObject, atomic: readers see the whole object or none) puts them under the
  final key, and the temporary key is deleted. A temporary key left by a killed writer is
  never read, only removed (:meth:`Location.remove_temps`).

URIs keep their query string (``s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http``)
when joined, so every file of a location reaches the same endpoint.

Example:
    >>> import tempfile
    >>> loc = Location(tempfile.mkdtemp()).child("out", "a.txt")
    >>> loc.write_bytes(b"hi"); loc.read_bytes()
    b'hi'
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pixelray.errors import one_line
from pixelray.store.atomic import TMP_GLOB, write_bytes_atomic

__all__ = ["Location", "is_remote", "join_uri"]


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """A URI of a filesystem other than the local one (``file://`` is local)."""
    text = os.fspath(uri)
    return "://" in text and not text.startswith("file://")


def join_uri(root: str | os.PathLike[str], *parts: str) -> str:
    """``root`` joined with ``parts``: a local path, or a URI whose query string is kept."""
    root = os.fspath(root)
    if "://" not in root:
        return os.path.join(root, *parts)
    scheme, netloc, path, query, fragment = urlsplit(root)
    path = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((scheme, netloc, path, query, fragment))


class Location:
    """A file or folder on the local disk or in an object store; see the module docstring."""

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri = os.fspath(uri)
        self.remote = is_remote(self.uri)
        if self.remote:
            try:
                self.fs, self.key = pafs.FileSystem.from_uri(self.uri)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise OSError(f"{self.uri}: cannot open this location ({one_line(exc)})") from None
        else:
            self.fs, self.key = pafs.LocalFileSystem(), os.path.abspath(self.uri.removeprefix("file://"))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    @property
    def path(self) -> Path | None:
        """The local path, or None in an object store."""
        return None if self.remote else Path(self.key)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))

    def child(self, *parts: str) -> Location:
        return Location(join_uri(self.uri, *parts))

    # ------------------------------------------------------------------ reading

    def exists(self) -> bool:
        return self.fs.get_file_info(self.key).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.key).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_table(self, **options: Any) -> pa.Table:
        with self.fs.open_input_file(self.key) as f:
            return pq.read_table(f, **options)

    def files(self) -> list[str]:
        """Every file below this folder, as paths relative to it ('/'-separated), sorted."""
        if self.fs.get_file_info(self.key).type != pafs.FileType.Directory:
            return []
        base = self.key.rstrip("/") + "/"
        found = self.fs.get_file_info(pafs.FileSelector(self.key, recursive=True))
        return sorted(i.path[len(base):] for i in found if i.type == pafs.FileType.File and i.path.startswith(base))

    # ------------------------------------------------------------------ writing

    def write_bytes(self, data: bytes | memoryview | Any) -> None:
        """Write the whole file atomically (see the module docstring)."""
        if not self.remote:
            write_bytes_atomic(data, self.key)
            return
        tmp = posixpath.join(posixpath.dirname(self.key), f".{self.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(memoryview(data))
            self.fs.copy_file(tmp, self.key)  # server-side copy: the final key appears whole
        finally:
            try:
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass  # removed by remove_temps() when the run starts again

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_table(self, table: pa.Table, **options: Any) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, **options)
        self.write_bytes(sink.getbuffer())

    def move_to(self, dest: Location) -> None:
        """Move this file to ``dest`` (a rename on a disk, a copy and a delete in an object store)."""
        if not self.remote and not dest.remote:
            Path(dest.key).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.key, dest.key)
            return
        dest.write_bytes(self.read_bytes())
        self.delete()

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            pass

    def remove_temps(self) -> list[str]:
        """Delete the temporary files of writes that never finished (a killed run's); returns them."""
        stale = [rel for rel in self.files() if fnmatch.fnmatch(posixpath.basename(rel), TMP_GLOB)]
        for rel in stale:
            self.child(rel).delete()
        return stale
