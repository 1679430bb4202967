"""``pixelray weights download``: fill the torch hub cache where there is internet (nothing else downloads)."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from pixelray.models.registry import (
    Weights,
    WeightsDownloadError,
    entry_file,
    parse_weights,
    torchvision_name,
    weights_entry,
    weights_label,
)


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout`` s, else the reason.

    Runs in a daemon thread so a DNS lookup that never answers cannot hang the caller.
    """
    outcome: dict[str, str] = {}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["ok"] = ""
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=attempt, name="pixelray-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    return outcome.get("error", f"no answer within {timeout:g} s")


def _endpoint(url: str) -> tuple[str, int]:
    """The host and port a download of ``url`` connects to first (its proxy, if one is set)."""
    parts = urlparse(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy_parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 80
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Make every new socket give up after ``seconds`` of silence (a stalled download fails)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_weights(
    name: str, weights: str | Weights = "imagenet", *, timeout: float = 10.0, progress: bool = True
) -> Path:
    """Download a model's pretrained weights into the torch hub cache (a no-op when present).

    Checks first that the download host answers within ``timeout`` seconds, so a machine
    without internet fails fast instead of hanging. The file's SHA-256 prefix (in its name)
    is verified, and it is written atomically (torch.hub writes a ``.partial`` then renames).

    Raises:
        WeightsDownloadError: the host is unreachable or the download failed.
    """
    kind = parse_weights(weights)
    entry = weights_entry(torchvision_name(name), kind)
    if entry is None:
        raise ValueError(f"weights: 'none' has no file to download; use 'imagenet' or 'default' for {name}")
    path = entry_file(entry)
    if path.is_file():
        return path
    host, port = _endpoint(entry.url)
    reason = _probe(host, port, timeout)
    if reason is not None:
        raise WeightsDownloadError(
            f"cannot reach {host}:{port} to download {path.name} ({reason}); no internet here? "
            f"Run `pixelray weights download {name} --weights {weights_label(kind).lower()}` on a "
            f"machine with internet and copy {path.name} into $TORCH_HOME/hub/checkpoints ({path.parent})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        with _socket_timeout(timeout):
            torch.hub.download_url_to_file(entry.url, str(path), match.group(1) if match else None, progress)
    except Exception as exc:  # noqa: BLE001 - urllib, OSError and the hash check all mean "failed"
        raise WeightsDownloadError(
            f"downloading {entry.url} to {path} failed ({type(exc).__name__}: {exc}); try again, "
            f"or copy {path.name} into {path.parent} from a machine that has it"
        ) from exc
    return path
