"""Long scenarios that run in the background while the rest of the suite runs.

The demo, the multi-node cluster and ``make cluster-local`` each take a minute or more, and
most of it is waiting: on Ray's processes starting, on polls, on subprocesses. The unit tests
meanwhile use one core of this 2-core machine. So a scenario (a function without arguments; the
session's data set and checkpoints come from :func:`session_assets`) is declared with
:func:`in_background`; once the tests are
collected, conftest.py starts the scenarios the selected tests need, one after another in one
background thread, and each test waits for its scenario with ``.result()``. A scenario's
exception (a failed assert inside it included) is raised there, in its test.

Subprocesses started with :func:`run` are killed when the session ends before they do.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

_SCENARIOS: list[Scenario] = []
_PROCESSES: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


class Scenario:
    """A function run once per session in the background thread; ``result()`` waits for it."""

    def __init__(self, fn: Callable[..., Any], fixture: str | None):
        self.fn, self.fixture, self.module = fn, fixture, fn.__module__
        self.name = fixture or fn.__name__
        self.future: Future | None = None
        self.started = self.finished = None  # time.monotonic() in the lane

    def wanted_by(self, item) -> bool:
        """Whether a collected test needs it: it is in the test's module, or a fixture the test uses."""
        in_module = getattr(item, "module", None) is not None and item.module.__name__ == self.module
        return in_module or (self.fixture is not None and self.fixture in getattr(item, "fixturenames", ()))

    def start(self) -> None:
        with _LOCK:
            if self.future is None:
                self.future = Future()
                _LANE.put(self)

    def result(self):
        """What the scenario returned (started here if the session did not start it)."""
        self.start()
        if threading.current_thread() is _LANE.thread and not self.future.done():  # it would wait for itself
            raise RuntimeError(f"{self.name}: a scenario waits for one started after it; declare this one first")
        return self.future.result()


class _Lane:
    """One daemon thread running the started scenarios in order: a session that ends early does not wait."""

    def __init__(self):
        self._work: list[Scenario] = []
        self._ready = threading.Condition()
        self.thread: threading.Thread | None = None

    def put(self, scenario: Scenario) -> None:
        with self._ready:
            self._work.append(scenario)
            self._ready.notify()
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="pixelray-tests-background", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._work:
                    self._ready.wait()
                scenario = self._work[0]
            if scenario.future.set_running_or_notify_cancel():
                scenario.started = time.monotonic()
                try:
                    scenario.future.set_result(scenario.fn())
                except BaseException as exc:  # noqa: BLE001 - raised again in the test that waits for it
                    scenario.future.set_exception(exc)
                scenario.finished = time.monotonic()
            with self._ready:
                self._work.pop(0)
                self._ready.notify_all()

    def finish(self, timeout: float) -> None:
        """Drop the scenarios not started; give the running one ``timeout`` s to end (its ``finally``)."""
        with self._ready:
            for scenario in self._work[1:]:
                scenario.future.cancel()
            self._ready.wait_for(lambda: not self._work or self._work[0].future.cancelled(), timeout)


_LANE = _Lane()


def in_background(fixture: str | None = None):
    """Declare a scenario (``@in_background()``); ``fixture``: the session fixture that serves it, if any."""

    def declare(fn):
        scenario = Scenario(fn, fixture)
        _SCENARIOS.append(scenario)
        return scenario

    return declare


def wanted(items) -> list[Scenario]:
    """The declared scenarios the collected tests need, in declaration order."""
    return [s for s in _SCENARIOS if any(s.wanted_by(item) for item in items)]


def last_wanted(item) -> int:
    """The place, in declaration (and so running) order, of the last scenario a test needs; -1 for none."""
    return max((i for i, s in enumerate(_SCENARIOS) if s.wanted_by(item)), default=-1)


def timeline(t0: float) -> list[str]:
    """When each scenario of the session ran, in seconds since ``t0`` (a time.monotonic())."""
    return [f"{s.name}: {s.started - t0:.0f}-{s.finished - t0:.0f} s ({s.finished - s.started:.0f} s)"
            for s in _SCENARIOS if s.started is not None and s.finished is not None]


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a process group of its own, killed
    (with its children: Ray's processes) if the test session ends first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    with _LOCK:
        _PROCESSES.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        proc.communicate()
        raise
    finally:
        with _LOCK:
            _PROCESSES.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(timeout: float = 180) -> None:
    """The session is ending: kill what the scenarios still run and let the running one clean up (a cluster
    it started is stopped in its ``finally``); the others never start."""
    with _LOCK:
        left = list(_PROCESSES)
    for proc in left:
        kill(proc)
    _LANE.finish(timeout)


class Assets(NamedTuple):
    data: str  # a synthetic data set: 10 classes, 600 images of 32x32, 100 per shard, seed 0
    models: list[str]  # two tiny CNNs trained briefly on it (seeds 0 and 1), as checkpoint:PATH specs


_ASSETS: list[Assets] = []
_ASSETS_LOCK = threading.Lock()


def session_assets() -> Assets:
    """The session's data set and checkpoints, built once, by whichever thread asks first."""
    with _ASSETS_LOCK:
        if not _ASSETS:
            _ASSETS.append(_build_assets(Path(tempfile.mkdtemp(prefix="pxr-assets-"))))
        return _ASSETS[0]


def _build_assets(root: Path) -> Assets:
    from pixelray.datasets.synthetic import make_synthetic
    from pixelray.models import load_model, save_checkpoint
    from pixelray.train.fit import TrainConfig, fit

    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data = root / "synthetic" / "synthetic-c10-n600"
    make_synthetic(data, classes=10, images=600, size=32, seed=0, rows_per_shard=100)
    models = []
    for seed in (0, 1):
        model = load_model("tiny", None, num_classes=10, init_seed=seed)
        fit(model, str(data), TrainConfig(epochs=2, seed=seed))
        models.append(f"checkpoint:{save_checkpoint(model, root / 'models' / f'tiny{seed}.pt', base='tiny')}")
    return Assets(str(data), models)


@in_background(fixture="demo_run")
def demo_scenario():
    """``pixelray demo`` run once, as a user runs it, in a fresh directory without ``jobs/`` (small sizes:
    500 images, 200 held out, one epoch per fit). Returns (the directory, the finished process)."""
    from helpers import console_script

    where = Path(tempfile.mkdtemp(prefix="pxr-demo-"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    small = ["--images", "500", "--heldout", "200", "--epochs", "1", "--finetune-epochs", "1"]
    return where, run([console_script(), "demo", "--no-progress", *small], cwd=where, env=env, timeout=900)
