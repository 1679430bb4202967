"""A sweep's output directory: claimed by one run at a time, and unit files that prove what they hold.

**The claim.** :meth:`RunDir.claim` checks that the directory can exist (not a file, not
under a file, creatable), creates it, and takes an exclusive ``flock`` on ``run.lock``,
which holds the config hash, pid, host and start time of the run. The kernel drops the
lock when the process dies, however it dies, so a lock file whose lock is free was left
by a dead run: it is taken over with a message. A live holder makes the second run fail
at once, naming the holder. :meth:`RunDir.abandon` undoes a claim that wrote nothing
else (a failed preflight), removing the directories it created.

**Unit files.** Each finished unit is one Parquet file whose metadata carries a
*fingerprint*: a hash of the config hash and everything the unit computed over (phase,
model, shard and its sha256, image ids, cells, judges). :meth:`RunDir.load_unit` returns a
unit's table only when the file reads whole and its fingerprint matches; anything else
(a truncated file, another plan's file) is moved aside to ``rejected/`` with a warning
and the unit counts as not done, so it is recomputed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pixelray.atomic import TMP_GLOB, write_table_atomic, write_text_atomic
from pixelray.errors import SweepError

__all__ = ["LOCK_NAME", "RUN_NAME", "RunDir", "fingerprint"]

LOCK_NAME = "run.lock"
RUN_NAME = "run.json"
_META_UNIT = b"pixelray.unit"


def fingerprint(**identity: Any) -> str:
    """A short stable hash of what a unit was computed from (JSON-serialisable values)."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _first_existing(path: Path) -> tuple[Path, list[Path]]:
    """The deepest existing ancestor of ``path`` (itself included) and the missing folders below it."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return path, missing[::-1]


class RunDir:
    """One sweep's output directory. Claim it before writing anything; release it when done.

    Args:
        path: the output directory.
        log: where warnings go (stale locks, rejected unit files).
    """

    def __init__(self, path: str | os.PathLike[str], log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.log = log or (lambda message: None)
        self._fd: int | None = None
        self._created: list[Path] = []

    # ------------------------------------------------------------------ the claim

    def check(self) -> None:
        """Refuse a path that cannot be an output directory, without creating anything."""
        where = self.path
        existing, _ = _first_existing(where.absolute())
        if existing == where.absolute() and not existing.is_dir():
            raise SweepError(f"[output] dir = {str(where)!r}: {where} is a file, not a directory; "
                             "choose a directory (--out DIR)")
        if not existing.is_dir():
            raise SweepError(f"[output] dir = {str(where)!r}: {existing} is a file; choose an output "
                             "directory that does not lie inside a file (--out DIR)")

    def claim(self, config_hash: str) -> None:
        """Create the directory if needed and lock it for this run (see the module docstring)."""
        self.check()
        _, missing = _first_existing(self.path.absolute())
        try:
            for folder in missing:
                folder.mkdir()
                self._created.append(folder)
        except OSError as exc:
            self._remove_created()
            raise SweepError(f"[output] dir = {str(self.path)!r}: {self.path}: cannot create the output "
                             f"directory ({exc.strerror}); choose a writable place (--out DIR)") from None
        lock = self.path / LOCK_NAME
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._remove_created()
                raise SweepError(f"[output] dir = {str(self.path)!r}: {self.path}: cannot create files there "
                                 f"({exc.strerror}); choose a writable place (--out DIR)") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise SweepError(
                    f"{self.path} is in use by another sweep (config {holder.get('config_hash', '?')}, pid "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}); "
                    "wait for it to finish, or write to another directory (--out)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed the file between our open and flock: again
        stale = _read_holder(fd)
        if stale:
            self.log(f"warning: {lock}: taking over a stale lock of a run that is gone (config "
                     f"{stale.get('config_hash', '?')}, pid {stale.get('pid', '?')} on {stale.get('host', '?')})")
        holder = {
            "config_hash": config_hash, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock and remove the lock file (a no-op when not claimed)."""
        if self._fd is None:
            return
        (self.path / LOCK_NAME).unlink(missing_ok=True)  # while still holding it: see claim()
        os.close(self._fd)
        self._fd = None

    def abandon(self) -> None:
        """Release, and remove the folders the claim created if they hold nothing else."""
        self.release()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    # ------------------------------------------------------------------ run.json

    def refuse_another_config(self, config_hash: str) -> None:
        """Refuse a directory that holds another config's run."""
        run_file = self.path / RUN_NAME
        if not run_file.exists():
            return
        try:
            previous = json.loads(run_file.read_text()).get("config_hash")
        except (OSError, ValueError, AttributeError):
            previous = "unreadable"
        if previous != config_hash:
            raise SweepError(
                f"{self.path} holds a run of another config (hash {previous} != {config_hash}); "
                "use another output directory (--out) or delete this one"
            )

    def start(self, meta: dict[str, Any]) -> None:
        """Write ``run.json`` (once) and remove temp files of a killed run (never read, only in the way)."""
        for stale in self.path.rglob(TMP_GLOB):
            if stale.is_file():
                stale.unlink()
        run_file = self.path / RUN_NAME
        if not run_file.exists():
            write_text_atomic(json.dumps(meta, indent=2, default=str) + "\n", run_file)
        self._created = []  # the directory now holds a run: never removed by abandon()

    # ------------------------------------------------------------------ unit files

    def unit_path(self, key: str) -> Path:
        return self.path / "units" / f"{key}.parquet"

    def write_unit(self, key: str, table: pa.Table, print_: str) -> None:
        """Write a finished unit's table with its fingerprint, atomically."""
        meta = dict(table.schema.metadata or {})
        meta[_META_UNIT] = json.dumps({"unit": key, "fingerprint": print_}).encode()
        write_table_atomic(table.replace_schema_metadata(meta), self.unit_path(key))

    def load_unit(self, key: str, print_: str) -> pa.Table | None:
        """The unit's table if its file is whole and was computed for ``print_``; else None (to recompute).

        A file that fails either test is moved to ``rejected/`` with a warning.
        """
        path = self.unit_path(key)
        if not path.exists():
            return None
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            self._reject(path, key, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            return None
        try:
            stamp = json.loads((table.schema.metadata or {}).get(_META_UNIT, b"{}"))
        except ValueError:
            stamp = {}
        if stamp.get("fingerprint") != print_ or stamp.get("unit") != key:
            self._reject(path, key, "written for another plan (config, data, images or cells)")
            return None
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != _META_UNIT}
        return table.replace_schema_metadata(meta or None)

    def _reject(self, path: Path, key: str, why: str) -> None:
        dest = self.path / "rejected" / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        self.log(f"warning: {path}: {why}; moved to {dest}, recomputing the unit")


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        holder = {"pid": "?", "config_hash": "unreadable"}
    return holder if isinstance(holder, dict) else {}
