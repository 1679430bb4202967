"""``checkpoint:s3://...``: a checkpoint in object storage, fetched into a local cache and loaded from there.

The URI names a state_dict file (with its ``.json`` sidecar beside it) or a ``pixelray
train-augment`` run directory (``model.pt`` and ``pixelray.json``). Both files are copied into
``$PIXELRAY_CACHE`` (default ``~/.cache/pixelray``) ``/checkpoints/<sha256 of the URI>/`` under their
own names, atomically, so that everything that reads a local checkpoint (its sidecar, its sha256,
``torch.load``) reads the copy. A copy is fetched again when the object's size or modification time
changed; the sidecar's sha256 then checks the pair as it does for local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pixelray.errors import one_line
from pixelray.models.checkpoints import RUN_MODEL_FILE, RUN_SIDECAR_FILE
from pixelray.store.atomic import write_bytes_atomic, write_text_atomic
from pixelray.store.storage import Location, join_uri

__all__ = ["cache_root", "fetch_checkpoint"]


def cache_root() -> Path:
    return Path(os.environ.get("PIXELRAY_CACHE") or Path.home() / ".cache" / "pixelray").expanduser()


def _stamp(loc: Location) -> dict:
    info = loc.fs.get_file_info(loc.key)
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _copy(loc: Location, dest: Path) -> None:
    """``loc`` into ``dest`` unless the copy there is of the same object (size, modification time)."""
    stamp_file = dest.with_name(f".{dest.name}.source.json")
    stamp = {"uri": loc.uri, **_stamp(loc)}
    try:
        if dest.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    write_bytes_atomic(loc.read_bytes(), dest)
    write_text_atomic(json.dumps(stamp), stamp_file)


def fetch_checkpoint(uri: str) -> Path:
    """The local copy of the state_dict a remote ``checkpoint:URI`` names (its sidecar copied beside it).

    Raises:
        ValueError: nothing there, or a directory without ``model.pt``, naming the URI.
    """
    try:
        loc = Location(uri)
        if loc.is_file():  # a state_dict file, its sidecar beside it
            scheme, netloc, path, query, fragment = urlsplit(uri)
            parent = urlunsplit((scheme, netloc, posixpath.dirname(path.rstrip("/")), query, fragment))
            state, base = loc, loc.name
            sidecars = [f"{base}.json", f"{posixpath.splitext(base)[0]}.json"]
        else:  # a run directory
            state, parent, base = Location(join_uri(uri, RUN_MODEL_FILE)), uri, RUN_MODEL_FILE
            sidecars = [f"{RUN_MODEL_FILE}.json", RUN_SIDECAR_FILE]
            if not state.is_file():
                raise ValueError(f"checkpoint: {uri} is neither a file nor a run directory holding {RUN_MODEL_FILE}; "
                                 "name a finished `pixelray train-augment` run or the state_dict file itself")
        folder = cache_root() / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        _copy(state, folder / base)
        for name in dict.fromkeys(sidecars):
            side = Location(join_uri(parent, name))
            if side.is_file():
                _copy(side, folder / name)
                break
    except OSError as exc:
        raise ValueError(f"checkpoint: cannot read {uri} ({one_line(exc, 300)}); check the URI and the "
                         "credentials") from None
    return folder / base
