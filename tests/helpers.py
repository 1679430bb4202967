"""Small helpers shared by the integration tests."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def wait_for(predicate, timeout: float = 120.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def session_address(ray) -> str:
    """The GCS address of the session's Ray (``ray_local``), for a driver in a subprocess to join it
    (``pixelray sweep --address``) instead of starting a Ray of its own."""
    return ray.get_runtime_context().gcs_address


def console_script() -> str:
    """The installed ``pixelray`` script of this interpreter's environment (else the one on PATH)."""
    import shutil
    import sys

    import pytest

    beside = Path(sys.executable).parent / "pixelray"
    found = str(beside) if beside.is_file() else shutil.which("pixelray")
    if found is None:
        pytest.fail("the pixelray console script is not installed; run `make install` (pip install -e .)")
    return found


def spawn(target, *args):
    """``target(*args)`` in a fresh interpreter of its own (multiprocessing's spawn: none of this process's
    Ray or torch state), started; a test kills it as it would any driver (``.kill()``: SIGKILL)."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def train_driver(cwd: str, raw: dict, hooks, address: str) -> None:
    """A train-augment driver (for :func:`spawn`): the raw config run from ``cwd`` on the Ray at ``address``,
    with test hooks (``pixelray.train.loop.TrainHooks``) that no command line can pass."""
    import os

    from pixelray.config.train import parse_train_config
    from pixelray.train.driver import run_train_augment

    os.chdir(cwd)
    run_train_augment(parse_train_config(raw), address=address, progress=False, hooks=hooks)


def sweep_command(config, ray=None, *args: str) -> list[str]:
    """``python -m pixelray sweep CONFIG --no-progress``, joining the session's Ray when ``ray`` is given."""
    import sys

    cmd = [sys.executable, "-m", "pixelray", "sweep", str(config), "--no-progress", *args]
    return cmd + (["--address", session_address(ray)] if ray is not None else [])


#: The attack sweep every attack test compares with (``attack_run``, conftest.py): its grid and its FGSM.
ATTACK_GRID = {"counts": [4, 32], "amplitudes": ["full", 60]}
# eps 4/255 fools the tiny CNNs on a few percent of the images, 32/255 on more than half: with
# size 20 the weakest eps needs about half of the shards, so the last units are skipped.
ATTACK = {"kind": "fgsm", "eps": [4, 8, 16, 32], "keep": "successful", "size": 20, "report_float": True}


def attack_config(data, models, out, batch_size=64, workers=1, threads=2, attack=ATTACK, **output) -> dict:
    """The raw config of an attack sweep: ATTACK_GRID and ``attack`` on the first 100 images of ``data``."""
    return {
        "data": {"path": str(data)},
        "models": {"names": list(models), "weights": "none"},
        "eval": {"filter": "all", "batch_size": batch_size, "size": 100},
        "grid": ATTACK_GRID,
        "attack": dict(attack),
        "output": {"dir": str(out), **output},
        "run": {"workers": workers, "threads": threads},
    }


def attack_tables(out, drop=()) -> dict:
    """The four tables of an attack sweep's output directory, less the columns ``drop``."""
    import pandas as pd

    return {name: pd.read_parquet(Path(out) / f"{name}.parquet").drop(columns=list(drop), errors="ignore")
            for name in ("cells", "attack", "transfer", "attack_ids")}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all bound at once, so no two are the same port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def unit_files(out: Path, phase: str = "cells") -> list[Path]:
    """The finished unit files of one phase of a sweep's output directory."""
    return sorted((Path(out) / "units" / phase).rglob("*.parquet"))


_PROMQL_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                    "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, durations or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = _PROMQL_GROUPING.sub(" ", s)  # label lists of by (...), on (...)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in ".$" or m.group().lower() in _PROMQL_KEYWORDS:
            continue  # 1e3, 5m, $variable
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(m.group())
    return names


def grafana_panels(path: Path) -> list[dict]:
    """The panels of a Grafana dashboard JSON, those inside collapsed rows included."""
    panels = []
    for panel in json.loads(Path(path).read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p.get("type") != "row"]


def grafana_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a Grafana dashboard JSON."""
    return [(p["title"], t["expr"]) for p in grafana_panels(path) for t in p["targets"]]


def exported_names(text: str) -> set[str]:
    """Sample names (``x_total``, ``x_created``...) in a Prometheus text exposition; it must parse."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


class Scraper:
    """Scrape a Prometheus endpoint on loopback every ``period`` seconds in a thread; ``seen`` collects
    every sample name ever exported. Ray drops a dead worker's gauges from its export within about ten
    seconds, so a test that checks what a short-lived worker exported must scrape while it runs."""

    def __init__(self, port: int, period: float = 0.5):
        self.url = f"http://127.0.0.1:{port}/metrics"  # loopback only
        self.period, self.seen = period, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.seen |= exported_names(response.read().decode())
            except OSError:  # the agent may not be up yet
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
