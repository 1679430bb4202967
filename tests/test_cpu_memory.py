"""Huge pages for torch's large CPU buffers: counted by the kernel (minor page faults), not assumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixelray.cpu_memory import HUGE_PAGES_ENV

MB = 64
PAGES_4K = MB * 256  # what touching a fresh 64 MB buffer costs in 4 KB pages

# a fresh process: `setup`, then the faults of touching one new 64 MB tensor, as the kernel counts them
PROBE = """
import resource, torch
{setup}
x = torch.empty({mb} << 20, dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x.fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


# The tests compare a process that asks for huge pages (torch's madvise) with one that does not, so
# they need exactly the kernel's ``madvise`` mode: under ``never`` nobody gets huge pages, under
# ``always`` the plain process gets them too (its 4 KB-page premise fails, and "asks for them" cannot
# be told from "got them anyway").
needs_thp = pytest.mark.skipif(_thp_mode() != "madvise",
                               reason=f"transparent huge pages are {_thp_mode()!r} here, not 'madvise': only "
                                      "then does asking for huge pages (torch's madvise) change what a process gets")


def _faults(setup: str, env_value: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if env_value is not None:
        env[HUGE_PAGES_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup, mb=MB)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def _probe(_actor) -> tuple[str | None, int]:
    """Inside a worker actor: its huge-pages variable, and the faults of touching one new 64 MB tensor."""
    import resource

    import torch

    x = torch.empty(MB << 20, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x.fill_(1)
    return os.environ.get(HUGE_PAGES_ENV), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_thp
def test_importing_and_building_a_worker_in_process_leaves_the_environment_alone():
    worker = ("from pixelray.engine.worker import ModelWorker; ModelWorker(device='cpu', threads=1); "
              f"import os; assert '{HUGE_PAGES_ENV}' not in os.environ")
    plain, with_worker = _faults(""), _faults(worker)
    assert plain >= PAGES_4K * 0.9, plain  # torch's default: one fault per 4 KB page
    assert with_worker >= PAGES_4K * 0.9, with_worker  # in-process: nothing asked for, nothing changed


@needs_thp
@pytest.mark.parametrize("huge_pages", [True, False])
def test_a_cpu_worker_actor_gets_huge_pages_from_its_runtime_env(ray_local, synthetic_dataset, tiny_checkpoints,
                                                                  tmp_path, huge_pages):
    """The session's Ray was started without the variable (tests/conftest.py): what the actor has, it got
    from the pool's runtime_env; ``[run] huge_pages = false`` leaves it out."""
    from pixelray.config.sweep import parse_config
    from pixelray.sweep.pool import WorkerPool
    from pixelray.telemetry import SweepTelemetry

    assert HUGE_PAGES_ENV not in os.environ  # the driver: the tests' own process
    models = {"names": tiny_checkpoints[:1], "weights": "none"}
    cfg = parse_config({"data": {"path": synthetic_dataset}, "models": models,
                        "grid": {"counts": [4]}, "output": {"dir": str(tmp_path / "out")},
                        "run": {"device": "cpu", "threads": 1, "huge_pages": huge_pages}})
    pool = WorkerPool(cfg, SweepTelemetry(progress=False))
    try:
        env, faults = ray_local.get(pool.workers[0].handle.__ray_call__.remote(_probe), timeout=120)
    finally:
        pool.shutdown()
    if huge_pages:
        assert env == "1" and faults <= PAGES_4K // 8, (env, faults)  # 2 MB pages: a few dozen faults
    else:
        assert env is None and faults >= PAGES_4K * 0.9, (env, faults)


@needs_thp
def test_the_cli_latches_huge_pages_for_its_process_and_passes_nothing_on():
    cli = ("from typer.testing import CliRunner; from pixelray.cli import app; "
           "assert CliRunner().invoke(app, ['cell', 'show', 'n4-full-whole-all-per-image-seed0', '--image-id', '5', "
           "'--size', '32']).exit_code == 0; import os; ")
    assert _faults(cli + f"assert '{HUGE_PAGES_ENV}' not in os.environ") <= PAGES_4K // 8
    # the environment's word wins: 0 turns it off (and stays as the user set it)
    assert _faults(cli + f"assert os.environ['{HUGE_PAGES_ENV}'] == '0'", env_value="0") >= PAGES_4K * 0.9
