"""Atomic, durable file writes: readers see the whole new file or the old one, never a part.

Every file pixelray writes for others to read (unit files, results tables, manifests,
checkpoints, run metadata) goes through :func:`write_atomic`: a temporary file in the
same directory (``.NAME.tmp-XXXX``), flushed and fsynced, renamed over the target, and
the directory entry fsynced, so a crash or a full disk leaves either the old file or
the complete new one. The new file gets the mode ``open()`` gives a new file (0666 less the umask), not
the temporary file's 0600. A temporary file left by a killed process is never read
(:data:`TMP_GLOB` finds them for clean-up).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "out" / "hello.txt"
    >>> digest = write_text_atomic("hi\\n", path)
    >>> path.read_text(), digest[:8]
    ('hi\\n', '98ea6e4f')
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["TMP_GLOB", "write_atomic", "write_bytes_atomic", "write_table_atomic", "write_text_atomic"]

#: Glob of the temporary files :func:`write_atomic` leaves when its process is killed.
TMP_GLOB = ".*.tmp-*"


class _Hashing:
    """A binary file wrapper that hashes what is written through it."""

    def __init__(self, f: IO[bytes]):
        self._f, self.digest = f, hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        return self._f.write(view)

    def __getattr__(self, name: str) -> Any:  # flush, tell, seek, ... of the real file
        return getattr(self._f, name)


def write_atomic(path: str | os.PathLike[str], write: Callable[[Any], None]) -> str:
    """Write a file atomically: ``write(f)`` fills a temp file that then replaces ``path``.

    Parent directories are created. Returns the sha256 hex digest of the bytes written
    through ``f.write`` (writers that seek back, such as zip files, should hash the file
    themselves). On any error the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp's is 0600: give the file the mode open() would have
        with os.fdopen(fd, "wb") as f:
            hashing = _Hashing(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return hashing.digest.hexdigest()


def _new_file_mode() -> int:
    """The mode a new file gets from ``open()``: 0666 less the umask (0644 under the usual 022), so that
    results are readable by whoever may read their folder (a file written earlier as 0600 gets it too)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes | memoryview | Any, path: str | os.PathLike[str]) -> str:
    """Write bytes (or any buffer, e.g. a pyarrow Buffer) atomically; returns their sha256."""
    return write_atomic(path, lambda f: f.write(memoryview(data)))


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> str:
    """Write UTF-8 text atomically; returns its sha256."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_table_atomic(table: Any, path: str | os.PathLike[str], **options: Any) -> str:
    """Write a pyarrow Table as Parquet atomically (``options`` go to ``pq.write_table``); returns its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return write_bytes_atomic(sink.getvalue(), path)
