"""``pixelray report``: what it writes and prints, and one-line refusals of directories that are no finished sweep."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_fixtures import cell, write_base_run, write_tuned_run
from test_cli import console_script, invoke

from pixelray.sweep import CELLS_SCHEMA


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    base, aug = write_base_run(root)
    return [base, write_tuned_run(root, aug)]


def _missing(d: Path) -> Path:
    return d / "nowhere"


def _empty(d: Path) -> Path:
    (d / "run").mkdir()
    return d / "run"


def _a_file(d: Path) -> Path:
    (d / "cells.parquet").write_text("x")
    return d / "cells.parquet"


def _other_tools_parquet(d: Path) -> Path:
    (d / "run").mkdir()
    pq.write_table(pa.table({"epoch": [1, 2], "loss": [0.5, 0.4]}), d / "run" / "metrics.parquet")
    return d / "run"


def _other_tools_cells(d: Path) -> Path:
    (d / "run").mkdir()
    pq.write_table(pa.table({"model": ["a"], "accuracy": [0.9]}), d / "run" / "cells.parquet")
    return d / "run"


def _interrupted(d: Path) -> Path:
    (d / "run" / "units" / "clean").mkdir(parents=True)
    (d / "run" / "run.json").write_text(json.dumps({"config_hash": "abc"}))
    return d / "run"


def _not_parquet(d: Path) -> Path:
    (d / "run").mkdir()
    (d / "run" / "cells.parquet").write_bytes(b"PAR1 but not really")
    return d / "run"


def _wrong_type(d: Path) -> Path:
    (d / "run").mkdir()
    table = pa.Table.from_pylist([cell("m", 4, 10, 1)], schema=CELLS_SCHEMA)
    table = table.set_column(table.schema.get_field_index("n_wrong"), "n_wrong", pa.array(["one"]))
    pq.write_table(table, d / "run" / "cells.parquet")
    return d / "run"


def _impossible_counts(d: Path) -> Path:
    (d / "run").mkdir()
    pq.write_table(pa.Table.from_pylist([cell("m", 4, 10, 11)], schema=CELLS_SCHEMA), d / "run" / "cells.parquet")
    return d / "run"


def _a_data_set(d: Path) -> Path:
    (d / "data").mkdir()
    (d / "data" / "manifest.json").write_text("{}")
    return d / "data"


BAD = {
    "missing": (_missing, "does not exist"),
    "empty": (_empty, "holds no sweep results (no cells.parquet)"),
    "a file": (_a_file, "is not a directory"),
    "another tool's Parquet": (_other_tools_parquet, "holds Parquet files (metrics.parquet) but no cells.parquet"),
    "another tool's cells.parquet": (_other_tools_cells, "is not a pixelray results table (no column experiment"),
    "interrupted run": (_interrupted, "unfinished sweep (run.json or units/ but no cells.parquet): rerun the same"),
    "not Parquet": (_not_parquet, "is not a readable Parquet file"),
    "a column of the wrong type": (_wrong_type, "a column has the wrong type"),
    "impossible counts": (_impossible_counts, "n_wrong = 11 of n_images = 10 is impossible"),
    "a data set": (_a_data_set, "is a data set (manifest.json), not sweep results"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_run_dir_gets_one_line_and_nothing_written(tmp_path, good_runs, case):
    make, message = BAD[case]
    bad = make(tmp_path)
    out = tmp_path / "report-out"
    for args in ([str(bad)], [str(good_runs[0]), str(bad)]):  # alone, and after a good run
        result = invoke("report", *args, "--out", str(out))
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {bad}") and message in lines[0], lines[0]
        assert "give the output directory of `pixelray sweep`" in lines[0] or "rerun" in lines[0]
        assert "Traceback" not in result.output and result.stdout == ""
        assert not out.exists()
    assert not (bad / "report").exists() and not (good_runs[0] / "report").exists()


def test_the_console_script_refuses_without_a_traceback(tmp_path):
    run = _interrupted(tmp_path)
    result = subprocess.run([console_script(), "report", str(run)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {run} holds an unfinished sweep (run.json or units/ but no cells.parquet): rerun the same "
        "`pixelray sweep` command with the same --out to finish it, then report"
    ]
    assert not (run / "report").exists()


def test_report_writes_and_prints_its_files(tmp_path, good_runs):
    out = tmp_path / "rep"
    result = invoke("report", *map(str, good_runs), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"report: {out / 'report.html'}", f"report: {out / 'report.md'}"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "amplitude.png", "area.png", "count.png", "fgsm.png", "fine-tuned.png", "pixel-index.png"]
    md_only = tmp_path / "md"
    result = invoke("report", str(good_runs[0]), "--out", str(md_only), "--format", "md")
    assert result.exit_code == 0 and result.stdout.splitlines() == [f"report: {md_only / 'report.md'}"]
    assert not (md_only / "report.html").exists()


def test_report_defaults_to_the_first_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.Table.from_pylist([cell("m", 4, 10, 1)], schema=CELLS_SCHEMA), run / "cells.parquet")
    result = invoke("report", str(run))
    assert result.exit_code == 0, result.output
    assert (run / "report" / "report.html").is_file() and (run / "report" / "report.md").is_file()


@pytest.mark.parametrize("formats", ["pdf", "html,pdf", ","])
def test_an_unknown_format_is_refused(tmp_path, good_runs, formats):
    result = invoke("report", str(good_runs[0]), "--out", str(tmp_path / "x"), "--format", formats)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --format: {formats!r} is invalid; use a comma-separated list of html, md"]
    assert not (tmp_path / "x").exists()
