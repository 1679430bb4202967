"""README.md as a newcomer follows it: every Python block runs on a fresh demo run, and every shell command
either runs here (on the demo's files, scaled down where the README says so) or names the test that runs it
or why it cannot run on this machine.

The demo run is ``pixelray demo`` in a fresh directory (the ``demo_run`` fixture, shared with test_cli); a
block that reads ``results/paper`` reads the demo's ``demo-out/results`` instead, and so on (``PATHS``).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from pathlib import Path

import background
import pandas as pd
import pytest
from background import demo_scenario, in_background
from helpers import console_script
from typer.testing import CliRunner

from pixelray.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

#: the README's paths -> the demo's (the longest first, so that a path is never half replaced)
PATHS = {
    "results/paper results/paper-finetuned": "demo-out/results",  # the report of two runs: of the demo's one
    "results/table10-sweep": "demo-out/results",
    "results/table10": "demo-out/models",
    "results/paper": "demo-out/results",
    "results/report": "demo-out/readme-report",
    "/data/imagenet-val": "demo-out/data",
    "runs/": "demo-out/readme-runs/",
    "--epochs 2": "--epochs 1",  # scaled down: one epoch per fine-tune
}

#: every shell command of the README -> how it is checked: ("run", expected exit code, text in the output),
#: ("test", "tests/FILE.py::TEST" that runs it), or ("not here", why)
COMMANDS = {
    "make install": ("test", ".ci/run: make install, then make test (this suite)"),
    "make test": ("test", ".ci/run: make install, then make test (this suite)"),
    "make demo": ("test", "tests/test_cli.py::test_demo_runs_from_any_directory"),  # `pixelray demo`, what it runs
    "pixelray pixel-index --wrong 352 --images 10000 --count 64": ("run", 0, "Pi = 27.60"),
    "pixelray prepare imagenet --src ILSVRC2012_img_val --labels ILSVRC2012_validation_ground_truth.txt "
    "--meta ILSVRC2012_devkit_t12/data/meta.mat --out /data/imagenet-val":
        ("test", "tests/test_datasets.py::test_imagenet_devkit_layout_matches_torchvision_and_skips_broken"),
    "pixelray prepare imagenet --src ILSVRC/Data/CLS-LOC/val --labels LOC_val_solution.csv "
    "--meta LOC_synset_mapping.txt --out /data/imagenet-val":
        ("test", "tests/test_datasets.py::test_imagenet_kaggle_labels_without_meta"),
    "pixelray prepare imagenet --src val --meta LOC_synset_mapping.txt --out /data/imagenet-val":
        ("test", "tests/test_datasets.py::test_imagenet_class_folder_layout_with_meta"),
    # resnet101's weights are not cached here: the label check says it is skipped
    "pixelray data check /data/imagenet-val --model resnet101": ("run", 0, "per class: "),
    "pixelray weights download --preset paper": ("not here", "downloads pretrained weights: no internet here"),
    "pixelray weights list": ("run", 0, "squeezenet1_1"),
    # as shipped, jobs/paper.toml names s3://YOUR-BUCKET: refused in one line before any network
    "pixelray sweep jobs/paper.toml --out results/paper": ("run", 2, "placeholder"),
    "pixelray plan jobs/paper.toml --data /data/imagenet-val --out results/paper":
        ("test", "tests/test_cli.py::test_plan_prints_the_work_and_refuses_what_the_sweep_refuses_with_the_same_line"),
    "pixelray plan jobs/paper.toml --data /data/imagenet-val --out results/paper --calibrate --workers 8":
        ("test", "tests/test_cli.py::test_plan_prints_the_work_and_refuses_what_the_sweep_refuses_with_the_same_line"
                 " (--calibrate, --throughput, --workers; the paper's pretrained weights are not here)"),
    "ray job submit --working-dir . -- python jobs/sweep.py --config jobs/paper.toml --out /shared/results/paper":
        ("not here", "ImageNet and the paper's pretrained weights; the job entry point's checks: "
                     "tests/test_entry_points.py"),
    "pixelray report results/paper results/paper-finetuned --out results/report": ("run", 0, "report.html"),
    "make cluster-local": ("test", "tests/test_cluster_local.py::test_cluster_local_token_job_metrics_and_stop"),
    ". /tmp/pxr-$(id -u)/env": ("test", "tests/test_cluster_local.py::test_cluster_local_token_job_metrics_and_stop"),
    "ray job submit -- python jobs/sweep.py --smoke-test":
        ("test", "tests/test_cluster_local.py::test_cluster_local_token_job_metrics_and_stop"),
    "make cluster-stop": ("test", "tests/test_cluster_local.py::test_cluster_local_token_job_metrics_and_stop"),
    "pixelray cell show n64-full-whole-all-per-image-seed0 --image-id 17 --data /data/imagenet-val":
        ("run", 0, "n64-full-whole-all-per-image-seed0"),
    "pixelray cell show ladder-full-whole-all-seed0 --image-id 17 --count 64 --data /data/imagenet-val":
        ("run", 0, "its first 64 positions"),
    "pixelray train-augment --model tiny --weights none --data demo-out/data --count 4 --epochs 2 "
    "--out runs/tiny-n4": ("run", 0, "done ->"),
    "pixelray train-augment --model tiny --weights none --data demo-out/data --count 4 --epochs 2 --aug none "
    "--out runs/tiny-none": ("run", 0, "done ->"),
    # as shipped, jobs/table10.toml names s3://YOUR-BUCKET: refused in one line before any network
    "pixelray train-augment jobs/table10.toml": ("run", 2, "placeholder"),
    "ray job submit --working-dir . -- python jobs/train_augment.py --config jobs/table10.toml --out /shared/table10":
        ("not here", "ImageNet and a pretrained ResNet-101; the job entry point's checks: tests/test_entry_points.py"),
    "pixelray train-augment jobs/table10.toml --data DIR --eval-data DIR --cpu":
        ("test", "tests/test_entry_points.py::test_train_augment_cpu_flag_trains_on_cpu"),
    "make lint": ("not here", "ruff: a developer's check, not part of CI"),
    "PIXELRAY_KUBERAY_CRDS=DIR .venv/bin/pytest tests/test_cluster_files.py":
        ("test", "tests/test_cluster_files.py (.ci/run sets PIXELRAY_KUBERAY_CRDS; the CRD tests fail, not skip, "
                 "without it there)"),
    '.venv/bin/pytest -m "not slow"': ("test", ".ci/run runs every test, the slow ones too"),
    "make bench": ("not here", "minutes of benchmarks, run by hand; their figures are in the README"),
}


def _blocks(lang: set[str]) -> list[str]:
    text = README.read_text()
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M) if tag in lang]


def readme_commands() -> list[str]:
    """The README's shell commands, one per line (continuations joined, comments dropped)."""
    commands = []
    for body in _blocks({"bash", "sh"}):
        for line in body.replace("\\\n", " ").splitlines():
            command = "" if line.lstrip().startswith("#") else re.split(r"\s#\s", line, maxsplit=1)[0]
            if command.strip():
                commands.append(re.sub(r"\s+", " ", command.strip()))
    return commands


def to_demo(text: str) -> str:
    for theirs, ours in PATHS.items():
        text = text.replace(theirs, ours)
    return text


def test_every_shell_command_is_checked_somewhere():
    commands = readme_commands()
    assert len(commands) > 20  # the parser found the README's commands
    new = set(commands) - set(COMMANDS)
    assert not new, f"new README commands: say in COMMANDS how each is checked: {new}"
    assert set(COMMANDS) <= set(commands), f"no longer in the README: {set(COMMANDS) - set(commands)}"
    for command, (how, *what) in COMMANDS.items():
        if how == "test" and "::" in what[0]:  # the named test exists
            file, name = what[0].split(" ")[0].split("::")
            assert re.search(rf"^def {name}\(", (REPO / file).read_text(), flags=re.M), (command, what[0])


@pytest.fixture(scope="module")
def demo(demo_run):
    where, done = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    return where


RUN_HERE = [c for c, (how, *_) in COMMANDS.items() if how == "run"]
#: the fine-tunes: minutes of Ray Train starting and stopping, run as a user types them (the console script,
#: an embedded Ray) in the background, after the demo, while other tests run
FINE_TUNES = [c for c in RUN_HERE if c.split()[1] == "train-augment" and COMMANDS[c][1] == 0]


@in_background()
def readme_fine_tunes() -> dict:
    """Each README fine-tune command's finished process, run in the demo's directory on its data."""
    where, done = demo_scenario.result()
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TORCH_HOME": str(where / "torch-home")}
    env.pop("RAY_ADDRESS", None)
    script = console_script()
    return {c: background.run([script, *shlex.split(to_demo(c))[1:]], cwd=where, env=env, timeout=600)
            for c in FINE_TUNES}


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN_HERE, ids=[c[:60] for c in RUN_HERE])
def test_a_readme_command_works_on_the_demo(command, demo, monkeypatch):
    _, code, text = COMMANDS[command]
    args = shlex.split(to_demo(command))
    assert args[0] == "pixelray"
    if command in FINE_TUNES:
        done = readme_fine_tunes.result()[command]
        assert done.returncode == code, (done.stdout + done.stderr)[-3000:]
        assert text in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
        return
    monkeypatch.setenv("TORCH_HOME", str(demo / "torch-home"))  # no pretrained weights cached, as on a new machine
    monkeypatch.chdir(REPO if "jobs/" in command else demo)
    if "jobs/" in command:  # the example configs, read from the checkout; anything written goes to the demo's dir
        args = [a if a.startswith("jobs/") else a.replace("demo-out", str(demo / "demo-out")) for a in args]
    result = CliRunner().invoke(app, args[1:], prog_name="pixelray")
    assert result.exit_code == code, result.output[-3000:]
    assert text in result.output, result.output[-3000:]
    if code == 2:  # refused in one line
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def _tables(block: str, namespace: dict) -> list[tuple[str, object]]:
    """Run a block statement by statement; returns what each bare expression shows (as a notebook would)."""
    shown = []
    for node in ast.parse(block).body:
        source = ast.get_source_segment(block, node)
        if isinstance(node, ast.Expr):
            shown.append((source, eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace)))
        else:
            exec(compile(ast.Module([node], []), "README.md", "exec"), namespace)
    return shown


def _labels_with_nan(index: pd.Index) -> bool:
    return bool(index.to_frame().isna().any().any()) if isinstance(index, pd.MultiIndex) else bool(index.isna().any())


@pytest.mark.slow
def test_every_python_block_runs_on_the_demo_and_its_tables_are_whole(demo, monkeypatch):
    blocks = _blocks({"python"})
    assert len(blocks) >= 6
    monkeypatch.chdir(demo)
    namespace: dict = {}  # one session, as in a notebook: later blocks use what earlier ones defined
    shown = [pair for block in blocks for pair in _tables(to_demo(block), namespace)]
    n_tables = 0
    for source, value in shown:
        if isinstance(value, (pd.DataFrame, pd.Series)):
            table = value if isinstance(value, pd.DataFrame) else value.to_frame()
            n_tables += 1
            assert len(table) and len(table.columns), f"empty table from README: {source}"
            # a NaN row or column label is rows of another kind let in (noise rows in a shift table)
            assert not _labels_with_nan(table.index), f"NaN in the rows of: {source}\n{table}"
            assert not _labels_with_nan(table.columns), f"NaN in the columns of: {source}\n{table}"
    assert n_tables >= 15
    # the blocks computed what they say: Pi's interval holds Pi (the wrong rate's would not: Pi = 16 x rate here)
    (pi,) = [value for source, value in shown if "pi_low" in source]
    assert len(pi) == 3 and (pi.pi_low <= pi.pixel_index).all() and (pi.pixel_index <= pi.pi_high).all(), pi
    n64 = namespace["n64"]  # full-range changes over the whole 32x32 image: Pi = rate / (64 / 32^2), by hand
    assert pi.pi_high.tolist() == pytest.approx((n64.ci_high * 32 * 32 / 64).tolist())
    assert pi.pi_low.tolist() == pytest.approx((n64.ci_low * 32 * 32 / 64).tolist())
    cells = pd.read_parquet(demo / "demo-out" / "results" / "cells.parquet")
    plain = cells[cells.attack.isna() & (cells.experiment == "count")]
    assert namespace["plain"][namespace["plain"].experiment == "count"].n_wrong.sum() == plain.n_wrong.sum()
