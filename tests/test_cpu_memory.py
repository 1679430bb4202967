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

# Two things the kernel records about one new 64 MB tensor touched after `setup`: whether its mapping
# was advised for huge pages (``hg`` in its /proc/self/smaps VmFlags: torch's madvise, what the
# variable changes) and the minor faults of touching it. The advice is certain; what it yields is up
# to the kernel: with memory fragmented (a busy machine) some 2 MB pages fall back to 4 KB ones, so a
# test asserts the advice, and the faults only where they are certain (no advice: one per 4 KB page).
PROBE_CODE = """
import resource

import torch

def probe(mb):
    x = torch.empty(mb << 20, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x.fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    here, flags = False, []
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if not head[0].endswith(":") and "-" in head[0]:
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                here = lo <= x.data_ptr() < hi
            elif here and head[0] == "VmFlags:":
                flags = head[1:]
    return "hg" in flags, faults
"""
PROBE = PROBE_CODE + """
{setup}
print(*probe({mb}))
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


def _huge(setup: str, env_value: str | None = None) -> tuple[bool, int]:
    """In a fresh process: (the tensor's mapping is advised for huge pages, faults of touching it)."""
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if env_value is not None:
        env[HUGE_PAGES_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup, mb=MB)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    advised, faults = done.stdout.split()[-2:]
    return advised == "True", int(faults)


def _probe(_actor) -> tuple[str | None, tuple[bool, int]]:
    """Inside a worker actor: its huge-pages variable, and what the kernel records of one new tensor."""
    scope = {}
    exec(PROBE_CODE, scope)
    return os.environ.get(HUGE_PAGES_ENV), scope["probe"](MB)


def _plain(huge: tuple[bool, int]) -> bool:
    """No advice, and one fault per 4 KB page (torch's default), as the kernel counted them."""
    advised, faults = huge
    return not advised and faults >= PAGES_4K * 0.9


@needs_thp
def test_importing_and_building_a_worker_in_process_leaves_the_environment_alone():
    worker = ("from pixelray.engine.worker import ModelWorker; ModelWorker(device='cpu', threads=1); "
              f"import os; assert '{HUGE_PAGES_ENV}' not in os.environ")
    plain, with_worker = _huge(""), _huge(worker)
    assert _plain(plain), plain  # torch's default
    assert _plain(with_worker), with_worker  # in-process: nothing asked for, nothing changed


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
        env, huge = ray_local.get(pool.workers[0].handle.__ray_call__.remote(_probe), timeout=120)
    finally:
        pool.shutdown()
    if huge_pages:
        assert env == "1" and huge[0], (env, huge)  # advised: 2 MB pages where the kernel has them
    else:
        assert env is None and _plain(huge), (env, huge)


@needs_thp
def test_the_cli_latches_huge_pages_for_its_process_and_passes_nothing_on():
    cli = ("from typer.testing import CliRunner; from pixelray.cli import app; "
           "assert CliRunner().invoke(app, ['cell', 'show', 'n4-full-whole-all-per-image-seed0', '--image-id', '5', "
           "'--size', '32']).exit_code == 0; import os; ")
    latched = _huge(cli + f"assert '{HUGE_PAGES_ENV}' not in os.environ")
    assert latched[0], latched
    # the environment's word wins: 0 turns it off (and stays as the user set it)
    off = _huge(cli + f"assert os.environ['{HUGE_PAGES_ENV}'] == '0'", env_value="0")
    assert _plain(off), off
