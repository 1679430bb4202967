"""Shared fixtures: one local Ray per test session, on loopback, sized to this machine."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
def synthetic_dataset(tmp_path_factory):
    """Root of a small synthetic data set (10 classes, 600 images, 32x32, 100 per shard, seed 0), built once."""
    from pixelray.datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "synthetic-c10-n600"
    make_synthetic(root, classes=10, images=600, size=32, seed=0, rows_per_shard=100)
    return str(root)


@pytest.fixture(scope="session")
def tiny_checkpoints(synthetic_dataset, tmp_path_factory):
    """Two tiny CNNs trained briefly on the synthetic data (seeds 0 and 1), as ``checkpoint:PATH`` model specs."""
    from pixelray.models import load_model, save_checkpoint
    from pixelray.shards import load_manifest
    from pixelray.train.fit import TrainConfig, fit

    root = tmp_path_factory.mktemp("models")
    n_classes = load_manifest(str(synthetic_dataset)).num_classes
    paths = []
    for seed in (0, 1):
        model = load_model("tiny", None, num_classes=n_classes, init_seed=seed)
        fit(model, str(synthetic_dataset), TrainConfig(epochs=2, seed=seed))
        paths.append(save_checkpoint(model, root / f"tiny{seed}.pt", base="tiny"))
    return [f"checkpoint:{p}" for p in paths]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``pixelray demo`` run once, as a user runs it, in a fresh directory without ``jobs/`` (small sizes:
    500 images, 200 held out, one epoch per fit). Returns (the directory, the finished process)."""
    import subprocess

    from helpers import console_script

    where = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    small = ["--images", "500", "--heldout", "200", "--epochs", "1", "--finetune-epochs", "1"]
    done = subprocess.run([console_script(), "demo", "--no-progress", *small], cwd=where, env=env, capture_output=True,
                          text=True, timeout=900)
    return where, done

