"""Shared fixtures: one local Ray per test session, on loopback, sized to this machine."""

from __future__ import annotations

import os
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
