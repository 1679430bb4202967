"""Shared fixtures: one local Ray per test session, on loopback, sized to this machine."""

from __future__ import annotations

import os

# OpenMP threads (torch's, in this process and in every Ray worker and subprocess, which inherit it) sleep
# when they wait instead of spinning: the suite runs several torch processes at once on 2 cores (a
# background scenario beside the tests), where spinning threads starve the others; on its own each runs
# as fast or faster. Read once, when torch loads OpenMP: set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import background  # noqa: E402
import pytest  # noqa: E402
from background import demo_scenario, session_assets  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray otherwise takes the machine's address for a node (even with --node-ip-address=127.0.0.1) and
# listens on every interface; with this, every Ray of the tests (and their subprocesses) stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# as pixelray's CLI does for itself: huge pages for this process's large CPU tensors (faster, same bits),
# without the variable in the environment the session's Ray inherits (its CPU workers get theirs from
# their runtime_env: tests/test_cpu_memory.py checks that)
from pixelray.cpu_memory import use_huge_pages_here  # noqa: E402

use_huge_pages_here()

TESTS = Path(__file__).resolve().parent
# The session's Ray workers (and every driver a test points at it) import what the tests define (toy
# attacks, exact models) from tests/: Ray's processes inherit this environment when ray_local starts it.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS.parent), str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
# Ray's temp dir, one per test session, inherited by every Ray the tests start and every
# driver they run: two sessions never share one, and nothing a killed run left in /tmp/ray is read. (A
# ray.cluster_utils.Cluster writes its address to <temp dir>/ray_current_cluster for address-less clients,
# Ray Train's placement-group cleaner among them, which waits 12 s per fine-tune on a dead address there.)
# Short: Ray's socket paths live under it.
RAY_TMPDIR = Path(tempfile.mkdtemp(prefix="pxr-t-", dir="/tmp"))
os.environ["RAY_TMPDIR"] = str(RAY_TMPDIR)
atexit.register(shutil.rmtree, RAY_TMPDIR, ignore_errors=True)
# Ray Train's controller polls its workers every 0.5 s instead of 2 s: a fine-tune's end (and a reported
# checkpoint's registration) is seen sooner; every fine-tune of the suite is shorter by a second or two.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# fake credentials for the tests' S3 server on 127.0.0.1 (tests/test_s3.py), for every Ray worker too
os.environ.update({"AWS_ACCESS_KEY_ID": "pixelray-test", "AWS_SECRET_ACCESS_KEY": "pixelray-test",
                   "AWS_EC2_METADATA_DISABLED": "true"})


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (2 CPUs, no dashboard) shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dataset():
    """Root of a small synthetic data set (10 classes, 600 images, 32x32, 100 per shard, seed 0), built once."""
    return session_assets().data


@pytest.fixture(scope="session")
def tiny_checkpoints(synthetic_dataset):
    """Two tiny CNNs trained briefly on the synthetic data (seeds 0 and 1), as ``checkpoint:PATH`` model specs."""
    return list(session_assets().models)


@pytest.fixture(scope="session")
def attack_run(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    """The reference attack sweep (helpers.attack_config: FGSM, examples saved to ``../adv``), run once: checked
    against a plain loop in test_attack_sweep.py, and the run every resumed or remote one must equal."""
    from helpers import attack_config

    from pixelray.config.sweep import parse_config
    from pixelray.sweep import run_sweep

    out = tmp_path_factory.mktemp("attack")
    raw = attack_config(synthetic_dataset, tiny_checkpoints, out / "run", save_adversarial=str(out / "adv"))
    return run_sweep(parse_config(raw), progress=False)


@pytest.fixture(scope="session")
def demo_run():
    """The demo's directory and finished process (:func:`demo_scenario`, run in the background)."""
    return demo_scenario.result()


def pytest_collection_modifyitems(items):
    """The modules without slow tests first: they run while the background scenarios do. Of the slow ones, those
    that wait for no scenario come next, then the others in the order their scenarios run: the main lane reaches
    a scenario's tests once it has (most likely) finished, instead of waiting for it."""
    module = lambda item: getattr(getattr(item, "module", None), "__name__", "")  # noqa: E731
    slow_modules = {module(item) for item in items if item.get_closest_marker("slow")}
    waits: dict[str, int] = {}
    for item in items:
        waits[module(item)] = max(waits.get(module(item), -1), background.last_wanted(item))
    # stable: file order within each group
    items.sort(key=lambda item: (module(item) in slow_modules, module(item) in slow_modules and waits[module(item)]))


def pytest_collection_finish(session):
    """Start the background scenarios the selected tests need (after the session's data and checkpoints)."""
    scenarios = background.wanted(session.items)
    if scenarios and not session.config.option.collectonly:
        session_assets()
        for scenario in scenarios:
            scenario.start()


SESSION_STARTED = time.monotonic()  # when conftest.py is imported: the session's start


def pytest_sessionfinish(session):
    background.finish()


def pytest_terminal_summary(terminalreporter):
    lines = background.timeline(SESSION_STARTED)
    if lines:
        terminalreporter.write_sep("=", "background scenarios (seconds since the session started)")
        for line in lines:
            terminalreporter.write_line(line)
