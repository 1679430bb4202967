"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for(predicate, timeout: float = 120.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def unit_files(out: Path, phase: str = "cells") -> list[Path]:
    """The finished unit files of one phase of a sweep's output directory."""
    return sorted((Path(out) / "units" / phase).rglob("*.parquet"))
