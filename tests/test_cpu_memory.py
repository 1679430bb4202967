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


@needs_thp
def test_a_worker_asks_for_huge_pages_before_its_first_tensor():
    worker = "from pixelray.engine.worker import ModelWorker; ModelWorker(device='cpu', threads=1)"
    plain = _faults("")
    with_worker = _faults(worker)
    assert plain >= PAGES_4K * 0.9, plain  # torch's default: one fault per 4 KB page
    assert with_worker <= PAGES_4K // 8, (with_worker, plain)  # 2 MB pages: a few dozen faults
    # the environment's word wins: 0 turns it off
    assert _faults(worker, env_value="0") >= PAGES_4K * 0.9


@needs_thp
def test_the_cli_asks_for_huge_pages_in_its_process_and_the_environment_it_passes_on():
    setup = ("from typer.testing import CliRunner; from pixelray.cli import app; "
             "assert CliRunner().invoke(app, ['pixel-index', '--wrong', '1', '--images', '2', "
             "'--count', '4']).exit_code == 0; "
             f"import os; assert os.environ['{HUGE_PAGES_ENV}'] == '1'")
    assert _faults(setup) <= PAGES_4K // 8
