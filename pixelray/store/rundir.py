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

**Object stores.** The directory may be a URI (``s3://bucket/run?endpoint_override=...``):
files go through :class:`pixelray.store.storage.Location` (atomic there too), and the claim is a
lease instead of a ``flock``: ``run.lock`` holds the holder and a token, renewed every
``LEASE_RENEW`` seconds; a lease not renewed for ``LEASE_TTL`` seconds is stale and taken
over. After writing its lease a run waits ``LEASE_SETTLE`` seconds and reads it back: of two
runs that start together only the one whose token stayed there goes on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from pixelray.errors import SweepError, one_line
from pixelray.store.storage import Location

__all__ = ["LEASE_TTL", "LOCK_NAME", "RUN_NAME", "RunDir", "fingerprint"]

LOCK_NAME = "run.lock"
RUN_NAME = "run.json"
_META_UNIT = b"pixelray.unit"
LEASE_TTL, LEASE_RENEW, LEASE_SETTLE = 120.0, 30.0, 2.0  # seconds (object stores)


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
        self.loc = Location(path)
        self.path = self.loc.path if not self.loc.remote else None  # the local directory
        self.log = log or (lambda message: None)
        self._fd: int | None = None
        self._lease: dict[str, Any] | None = None
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._created: list[Path] = []

    def __str__(self) -> str:
        return self.loc.uri

    def file(self, *parts: str) -> Location:
        """A file of the run (e.g. ``file("cells.parquet")``)."""
        return self.loc.child(*parts)

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
        if self.loc.remote:
            self._claim_lease(config_hash)
            return
        self.check()
        _, missing = _first_existing(self.path.absolute())
        try:
            for folder in missing:
                try:
                    folder.mkdir()
                except FileExistsError:
                    if not folder.is_dir():  # a file appeared there: the error below names it
                        raise
                    continue  # another run created it between our look and our mkdir: it is not ours
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
                raise SweepError(_in_use(self.path, holder)) from None
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

    def _claim_lease(self, config_hash: str) -> None:
        lock = self.file(LOCK_NAME)
        try:
            holder = _read_json(lock)
            if holder and _lease_alive(holder):
                raise SweepError(_in_use(self.loc.uri, holder))
            if holder:
                self.log(f"warning: {lock}: taking over a stale lease of a run that is gone (config "
                         f"{holder.get('config_hash', '?')}, pid {holder.get('pid', '?')} on "
                         f"{holder.get('host', '?')})")
            mine = {
                "config_hash": config_hash, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex, "renewed": time.time(),
            }
            lock.write_text(json.dumps(mine))
            time.sleep(LEASE_SETTLE)
            back = _read_json(lock)
        except (OSError, pa.ArrowException) as exc:
            raise SweepError(f"[output] dir = {self.loc.uri!r}: cannot write there ({one_line(exc)}); "
                             "check the bucket, the endpoint and the credentials") from None
        if back.get("token") != mine["token"]:
            raise SweepError(_in_use(self.loc.uri, back))
        self._lease = mine
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="pixelray-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        lock = self.file(LOCK_NAME)
        while not self._stop.wait(LEASE_RENEW):
            try:
                if _read_json(lock).get("token") != self._lease["token"]:
                    self.log(f"warning: {lock}: another run took this directory's lease; results may mix")
                    return
                lock.write_text(json.dumps({**self._lease, "renewed": time.time()}))
            except (OSError, pa.ArrowException) as exc:
                self.log(f"warning: {lock}: cannot renew the lease ({exc})")

    def release(self) -> None:
        """Drop the lock and remove the lock file (a no-op when not claimed)."""
        if self._lease is not None:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join(5)
            lock = self.file(LOCK_NAME)
            try:
                if _read_json(lock).get("token") == self._lease["token"]:
                    lock.delete()
            except (OSError, pa.ArrowException):
                pass
            self._lease = None
            return
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
        run_file = self.file(RUN_NAME)
        if not run_file.exists():
            return
        try:
            previous = json.loads(run_file.read_bytes()).get("config_hash")
        except (OSError, ValueError, AttributeError):
            previous = "unreadable"
        if previous != config_hash:
            raise SweepError(
                f"{self.loc.uri} holds a run of another config (hash {previous} != {config_hash}); "
                "use another output directory (--out) or delete this one"
            )

    def start(self, meta: dict[str, Any]) -> None:
        """Write ``run.json`` (once) and remove temp files of a killed run (never read, only in the way)."""
        self.loc.remove_temps()
        run_file = self.file(RUN_NAME)
        if not run_file.exists():
            run_file.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        self._created = []  # the directory now holds a run: never removed by abandon()

    # ------------------------------------------------------------------ unit files

    def unit_file(self, key: str) -> Location:
        return self.file("units", f"{key}.parquet")

    def unit_path(self, key: str) -> Path:
        """The local path of a unit file (local directories only; see :meth:`unit_file`)."""
        return self.path / "units" / f"{key}.parquet"

    def write_unit(self, key: str, table: pa.Table, print_: str) -> None:
        """Write a finished unit's table with its fingerprint, atomically."""
        meta = dict(table.schema.metadata or {})
        meta[_META_UNIT] = json.dumps({"unit": key, "fingerprint": print_}).encode()
        self.unit_file(key).write_table(table.replace_schema_metadata(meta))

    def load_unit(self, key: str, print_: str) -> pa.Table | None:
        """The unit's table if its file is whole and was computed for ``print_``; else None (to recompute).

        A file that fails either test is moved to ``rejected/`` with a warning.
        """
        loc = self.unit_file(key)
        if not loc.exists():
            return None
        try:
            table = loc.read_table()
        except (OSError, pa.ArrowException) as exc:
            self._reject(loc, key, f"unreadable ({type(exc).__name__}: {one_line(exc, 200)})")
            return None
        try:
            stamp = json.loads((table.schema.metadata or {}).get(_META_UNIT, b"{}"))
        except ValueError:
            stamp = {}
        if stamp.get("fingerprint") != print_ or stamp.get("unit") != key:
            self._reject(loc, key, "written for another plan (config, data, images or cells)")
            return None
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != _META_UNIT}
        return table.replace_schema_metadata(meta or None)

    def _reject(self, loc: Location, key: str, why: str) -> None:
        dest = self.file("rejected", f"{key}.{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.parquet")
        loc.move_to(dest)
        self.log(f"warning: {loc}: {why}; moved to {dest}, recomputing the unit")


def _in_use(where: Any, holder: dict[str, Any]) -> str:
    return (f"{where} is in use by another run (config {holder.get('config_hash', '?')}, pid "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}); "
            "wait for it to finish, or write to another directory (--out)")


def _lease_alive(holder: dict[str, Any]) -> bool:
    """A lease renewed within LEASE_TTL whose holder, when on this host, is still running."""
    try:
        fresh = time.time() - float(holder.get("renewed", 0)) < LEASE_TTL
    except (TypeError, ValueError):
        return False
    if not fresh or holder.get("host") != socket.gethostname():
        return fresh
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False  # its process is gone: the lease is stale however fresh
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _read_json(loc: Location) -> dict[str, Any]:
    """A small JSON object file, {} when absent or unreadable as one."""
    try:
        body = json.loads(loc.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        return {"config_hash": "unreadable"}
    return body if isinstance(body, dict) else {}


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        holder = {"pid": "?", "config_hash": "unreadable"}
    return holder if isinstance(holder, dict) else {}
