"""Checking TOML tables: one error type and a few helpers that name the table, the key, the value and the fix.

Both configs (the sweep's :mod:`pixelray.config.sweep`, the fine-tune's :mod:`pixelray.config.train`)
read their files and check their keys through these.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tomllib

from pixelray.core.check import is_int

__all__ = ["ConfigError", "check_keys", "check_placeholder", "get_value", "int_list", "read_toml",
           "refuse_lost_output"]


class ConfigError(ValueError):
    """An invalid sweep config; the message names the key, the value and the fix."""


def get_value(table: dict, key: str, where: str, kind: type | tuple[type, ...], default: Any = ...,
              fix: str = "") -> Any:
    """``table[key]`` of type ``kind`` (bool is never taken for int), else ``default``; ConfigError naming
    ``[where] key``, the value and ``fix`` when it is missing without a default or of the wrong type."""
    if key not in table:
        if default is ...:
            raise ConfigError(f"[{where}] {key}: missing; {fix or 'add it'}")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"[{where}] {key} = {value!r}: expected {_kind_name(kind)}; {fix}".rstrip("; "))
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def check_keys(table: dict, allowed: set[str], where: str) -> None:
    """ConfigError listing the keys of ``[where]`` that are not ``allowed`` (a typo is never ignored)."""
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"[{where}] unknown key(s) {extra}; allowed: {sorted(allowed)}")


def int_list(table: dict, key: str, where: str, default: Any = ...) -> tuple[int, ...]:
    """A non-empty list of integers at ``[where] key`` as a tuple (``default`` when absent)."""
    value = get_value(table, key, where, list, default, fix="use a list of integers, e.g. [4, 8, 16]")
    if value is default:
        return value
    if not value or not all(is_int(v) for v in value):
        raise ConfigError(f"[{where}] {key} = {value!r}: expected a non-empty list of integers, e.g. [4, 8, 16]")
    return tuple(value)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables; ConfigError naming the file when it is missing or not TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


#: A value left as the example wrote it: an upper-case ``YOUR-BUCKET``/``YOUR_DIR`` token, or ``<bucket>``.
_PLACEHOLDER = re.compile(r"(?<![\w-])YOUR[-_][A-Z0-9][A-Z0-9_-]*|<[^<>]+>")


def check_placeholder(value: str | None, key: str, flag: str | None = None) -> None:
    """ConfigError naming ``key`` when ``value`` (a path or URI) still holds an example's placeholder,
    such as ``s3://YOUR-BUCKET/shards`` or ``<dir>``: it would otherwise end in a DNS lookup or a
    missing directory far from the config."""
    found = _PLACEHOLDER.search(value) if isinstance(value, str) else None
    if found:
        also = f" (or pass {flag})" if flag else ""
        raise ConfigError(f"{key} = {value!r}: {found.group(0)!r} is a placeholder; replace the placeholder "
                          f"with your own bucket or directory{also}")


def refuse_lost_output(output_dir: str, key: str = "[output] dir", *, uri_ok: bool = True,
                       cwd: Path | None = None) -> None:
    """ConfigError for a relative ``output_dir`` inside an uploaded working directory (``ray job submit
    --working-dir``): Ray deletes that copy, and what was written into it, after the job. ``uri_ok``:
    the fix may name an s3:// URI (a sweep's or a fine-tune's output may be one; a smoke test's not)."""
    cwd = cwd or Path.cwd()
    uploaded = "runtime_resources" in cwd.parts or "working_dir_files" in str(cwd)
    if uploaded and "://" not in output_dir and not Path(output_dir).is_absolute():
        raise ConfigError(f"{key} = {output_dir!r} is relative, and this job runs in the copy of its "
                          f"working directory that Ray deletes after the job ({cwd}); give an absolute "
                          f"path on storage every node shares{', or an s3:// URI' if uri_ok else ''} (--out)")
