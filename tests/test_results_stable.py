"""Results of the existing configs do not change when the code is reorganised.

``tests/data/demo_golden_cells.csv`` holds the pixel-change rows of a sweep of
``jobs/demo.toml`` made by the code before the driver was split into a package
(commit de2aede), over models and data that give the same predictions on every CPU
(``exact_models.py``: integer images, integer weights, exact sums). The same sweep by
today's code must give the same rows, row by row.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
import tomllib
from exact_models import make_data

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "data" / "demo_golden_cells.csv"


@pytest.mark.slow
def test_a_demo_sweep_gives_the_rows_it_gave_before_the_split(tmp_path):
    make_data(tmp_path / "data")
    raw = tomllib.loads((TESTS.parent / "jobs" / "demo.toml").read_text())
    raw["data"]["path"] = str(tmp_path / "data")
    raw["models"]["names"] = ["exact_models:make0", "exact_models:make1"]
    raw["output"]["dir"] = str(tmp_path / "out")
    config = tmp_path / "sweep.toml"
    config.write_text(tomli_w.dumps(raw))
    # a sweep of its own, so that its Ray workers import exact_models from tests/ too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "pixelray", "sweep", str(config), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    golden = pd.read_csv(GOLDEN, dtype={"amplitude": str})
    cells = pd.read_parquet(tmp_path / "out" / "cells.parquet")
    plain = cells[cells.attack.isna()]
    if "family" in plain.columns:
        plain = plain[plain.family == "pixel_change"]
    assert (golden.n_wrong > 0).any() and len(golden) == 24
    pd.testing.assert_frame_equal(plain[golden.columns].reset_index(drop=True), golden, check_dtype=False)
