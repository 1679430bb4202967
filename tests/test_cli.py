"""The ``pixelray`` command line: help, version, ``pixel-index`` and its one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import console_script
from typer.testing import CliRunner

from pixelray import __version__
from pixelray.cli import app
from pixelray.core.metrics import pixel_index, pixel_index_interval

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), prog_name="pixelray")


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Usage: pixelray" in result.stdout
    assert "pixel-index" in result.stdout


def test_pixel_index_help():
    result = invoke("pixel-index", "--help")
    assert result.exit_code == 0
    for option in ("--wrong", "--images", "--count", "--amplitude", "--area", "--size"):
        assert option in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"pixelray {__version__}\n"


def test_pixel_index_table_5():
    result = invoke("pixel-index", "--wrong", "352", "--images", "10000", "--count", "64")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Pi = 27.60  (95% CI 24.90 .. 30.57)"
    assert lines[1].startswith("w = 3.5200%  (95% CI 3.1763% .. 3.8994%), n = 64, amplitude = full")
    assert "area = 224, image = 224x224" in lines[1]
    assert result.stderr == ""


def test_pixel_index_shift_and_area():
    args = ["--wrong", "1000", "--images", "10000", "--count", "16", "--amplitude", "40", "--area", "100"]
    result = invoke("pixel-index", *args)
    assert result.exit_code == 0, result.output
    pi = pixel_index(1000, 10000, 16, 40, 100, 224)
    low, high = pixel_index_interval(1000, 10000, 16, 40, 100, 224)
    assert result.stdout.splitlines()[0] == f"Pi = {pi:.2f}  (95% CI {low:.2f} .. {high:.2f})"
    assert "amplitude = 40, area = 100" in result.stdout


def test_pixel_index_section_5_example():
    result = invoke("pixel-index", "--wrong", "1000", "--images", "10000", "--count", "64", "--area", "200")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Pi = 98.34 ")


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        (["--amplitude", "300"], "amplitude", "300"),
        (["--amplitude", "0"], "amplitude", "0"),
        (["--amplitude", "half"], "amplitude", "half"),
        (["--amplitude", "-5"], "amplitude", "-5"),
        (["--count", "0"], "count", "0"),
        (["--count", "50177"], "count", "50177"),
        (["--area", "500"], "area", "500"),
        (["--area", "0"], "area", "0"),
        (["--wrong", "10001"], "--wrong 10001", "0..--images (10000)"),
        (["--wrong", "-1"], "--wrong -1", "0..--images (10000)"),
        (["--images", "0", "--wrong", "0"], "--images 0", "integer >= 1"),
    ],
)
def test_bad_values_give_a_one_line_error(extra, field, value):
    args = {"--wrong": "352", "--images": "10000", "--count": "64"}
    for key, val in zip(extra[::2], extra[1::2], strict=True):
        args[key] = val
    result = invoke("pixel-index", *[x for kv in args.items() for x in kv])
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {field}: ") and value in lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_console_script_works():
    script = console_script()
    env = {**os.environ, "NO_COLOR": "1"}
    ok = subprocess.run(
        [script, "pixel-index", "--wrong", "352", "--images", "10000", "--count", "64"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "Pi = 27.60  (95% CI 24.90 .. 30.57)"
    bad = subprocess.run(
        [script, "pixel-index", "--wrong", "352", "--images", "10000", "--count", "64", "--amplitude", "300"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "error: amplitude: 300 is outside 1..255; use 'full' or an integer shift 1..255"
    ]


def test_commands_that_compute_nothing_with_torch_do_not_import_it():
    """pixel-index and --help start in a fraction of a second: no torch (2 s to import) in their process."""
    code = ("import sys; from typer.testing import CliRunner; from pixelray.cli import app; "
            "r = CliRunner().invoke(app, ['pixel-index', '--wrong', '352', '--images', '10000', '--count', '64']); "
            "assert r.exit_code == 0, r.output; assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'ray')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "pixelray", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pixelray {__version__}"


TINY = "[models]\nnames = ['tiny']\nweights = 'none'\n"


@pytest.mark.parametrize(
    "toml, message",
    [
        (f"[data]\npath = 'x'\n{TINY}[grid]\ncounts = [0]\n", "count: 0 is invalid"),
        (f"[data]\npath = 'x'\n{TINY}[grid]\ncounts = [4]\nshape = 1\n",
         r"\[grid\] unknown key\(s\) \['shape'\]"),
        (f"[data]\npath = 'nowhere'\n{TINY}[grid]\ncounts = [4]\n", "path = 'nowhere'"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_sweep_refuses_a_bad_config_in_one_line_and_writes_nothing(tmp_path, toml, message):
    import re

    config = tmp_path / "sweep.toml"
    config.write_text(toml)
    out = tmp_path / "out"
    result = invoke("sweep", str(config), "--out", str(out), "--no-progress")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_sweep_of_a_missing_config_file(tmp_path):
    result = invoke("sweep", str(tmp_path / "none.toml"))
    assert result.exit_code == 2 and "no such config file" in result.stderr


# --- pixelray cell show: one image's draws, from a result row's cell_id ---------------------------


def _image_of(data: str, image_id: int):
    """One image (H, W, 3) uint8 of a data set, read with pyarrow alone."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    for path in sorted(Path(data).glob("*.parquet")):
        table = pq.read_table(path, columns=["image_id", "image"])
        ids = table.column("image_id").to_pylist()
        if image_id in ids:
            raw = table.column("image")[ids.index(image_id)].as_py()
            return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(32, 32, 3).copy())
    raise AssertionError(f"no image {image_id}")


@pytest.mark.parametrize("cell_id", ["n16-a40-s20-c02-per-image-seed3", "n64-full-whole-all-per-image-seed0",
                                     "n9-a127-s8-all-shared-seed5"])
def test_cell_show_gives_the_entries_the_cell_changes(synthetic_dataset, cell_id):
    import json

    import reference_perturb
    import torch

    from pixelray.core.spec import Cell

    result = invoke("cell", "show", cell_id, "--image-id", "123", "--data", synthetic_dataset, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    image = _image_of(synthetic_dataset, 123)
    changed = reference_perturb.apply_pixel_changes(image[None], Cell.from_id(cell_id), [123])[0]
    entries = list(zip(record["y"], record["x"], record["channel"], strict=True))
    assert len(set(entries)) == len(entries) == Cell.from_id(cell_id).change.count * len(
        Cell.from_id(cell_id).change.channel_indices)
    assert [int(image[y, x, c]) for y, x, c in entries] == record["old"]
    assert [int(changed[y, x, c]) for y, x, c in entries] == record["value"]
    untouched = torch.ones_like(image, dtype=torch.bool)
    for y, x, c in entries:
        untouched[y, x, c] = False
    assert torch.equal(changed[untouched], image[untouched])  # nothing else changes


def test_cell_show_gives_a_corruption_s_entries_as_the_sweep_applies_them(synthetic_dataset):
    import json

    import torch

    from pixelray.core.corrupt import apply_cell
    from pixelray.core.spec import Cell

    result = invoke("cell", "show", "impulse_noise-sev2-seed4", "--image-id", "123", "--data", synthetic_dataset,
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    image = _image_of(synthetic_dataset, 123)
    rebuilt = image.clone()
    for y, x, c, v in zip(record["y"], record["x"], record["channel"], record["value"], strict=True):
        rebuilt[y, x, c] = v
    # what the sweep applies, and only that: the entries written into the image give its noisy version
    assert torch.equal(rebuilt, apply_cell(image[None], Cell.from_id("impulse_noise-sev2-seed4"), [123])[0])
    assert record["old"] == [int(image[y, x, c]) for y, x, c in zip(record["y"], record["x"], record["channel"],
                                                                        strict=True)]
    assert 0.03 < len(record["y"]) / image.numel() < 0.09  # severity 2 replaces 6% of the values
    text = invoke("cell", "show", "impulse_noise-sev2-seed4", "--image-id", "123", "--size", "32")
    assert text.exit_code == 0 and "impulse_noise at severity 2" in text.stdout


def test_cell_show_reads_a_whole_image_area_as_whole_and_refuses_bad_ids():
    same = [invoke("cell", "show", cid, "--image-id", "5", "--size", "32", "--json")
            for cid in ("n4-full-s32-all-per-image-seed0", "n4-full-whole-all-per-image-seed0")]
    assert all(r.exit_code == 0 for r in same)
    assert same[0].stdout == same[1].stdout and '"cell_id": "n4-full-whole-all-per-image-seed0"' in same[0].stdout
    table = invoke("cell", "show", "n2-a10-s16-c0-per-image-seed1", "--image-id", "5", "--size", "32")
    assert table.exit_code == 0 and "shift" in table.stdout and "give --data" in table.stdout
    for args, message in [
        (("nope", "--image-id", "1"), "cell_id: 'nope' is not a cell id"),
        (("n4-full-whole-c10-per-image-seed0", "--image-id", "1"), "not in canonical form"),
        (("n4-full-s300-all-per-image-seed0", "--image-id", "1", "--size", "224"), "area: 300 is larger"),
        (("n4-full-whole-all-per-image-seed0", "--image-id", "1", "--size", "2x"), "--size '2x': expected"),
    ]:
        result = invoke("cell", "show", *args)
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_demo_runs_from_any_directory(demo_run):
    # the demo's config ships in the package: no jobs/ where it runs. The size and epoch options make
    # small assets, so that the test takes a minute, not five, running the command once, as users do
    # (tests/test_readme.py runs the README's recipes on the same run).
    from pixelray.cli.demo import DEMO_CONFIG
    from pixelray.shards import load_manifest

    assert DEMO_CONFIG.is_file() and (Path(__file__).resolve().parents[1] / "jobs" / "demo.toml").resolve() == \
        DEMO_CONFIG.resolve()
    tmp_path, done = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    demo = tmp_path / "demo-out"
    assert [load_manifest(str(demo / d)).num_images for d in ("data", "heldout")] == [500, 200]
    epochs = [len(pq.read_table(demo / "models" / m / "epochs.parquet")) for m in ("tiny-none", "tiny-aug384")]
    assert epochs == [1, 1]  # the fine-tunes: train-augment runs of one epoch each
    assert not (tmp_path / "jobs").exists()
    assert (tmp_path / "demo-out" / "results" / "cells.parquet").is_file()
    assert "report: " in done.stdout and (tmp_path / "demo-out" / "results" / "report" / "report.html").is_file()
    # the report knows the fine-tunes from the sidecars `pixelray train-augment` wrote (pixelray.json in each run
    # directory): Table 10 holds the augmented one, Table 11 the base model's examples judged by it
    md = (demo / "results" / "report" / "report.md").read_text()
    sections = {head.split("\n", 1)[0]: head for head in md.split("\n### ")[1:]}
    t10 = next(v for k, v in sections.items() if k.startswith("Table 10:"))
    t11 = next(v for k, v in sections.items() if k.startswith("Table 11:"))
    assert "*Absent" not in t10 and "| tiny-aug384 | 384 pixels |" in t10, t10
    assert "*Absent" not in t11 and "| tiny-aug384 |" in t11 and "tiny (attacked)" in t11, t11
    assert "tiny-none" not in t11  # the control is a fine-tune too: neither an attacked base nor an augmented judge
    for line in t11.splitlines():  # tiny-aug384 judges exactly the examples kept on tiny, at each attack and eps
        if line.startswith("| ") and "| tiny (attacked) |" in line:
            kept = line.split(" | ")[3].split(" · ")[0].split("/")[1]
            judged = next(x for x in t11.splitlines() if x.startswith(line.split(" | ")[0] + " | tiny-aug384 |"))
            assert judged.split(" | ")[3].split(" · ")[0].split("/")[1] == kept, (line, judged)
    assert not re.search(r"n = \d+\.\d", md)  # counts are integers in every header
    # FGSM and PGD at one eps keep their own examples: attack_ids.parquet says which kept which
    ids = pq.read_table(demo / "results" / "attack_ids.parquet").to_pandas()
    kept = ids.groupby(["model", "attack", "attack_params", "eps"]).size()
    attack = pq.read_table(demo / "results" / "attack.parquet").to_pandas()
    assert {"fgsm", "pgd"} <= set(ids.attack)
    assert all(kept.get((r.model, r.attack, r.attack_params, r.eps), 0) == r.n_kept for r in attack.itertuples())
    # pixels to failure: the demo's ladder over the three models, its survival plot, medians side by side, and the
    # pixels to restore every kept example
    assert (demo / "results" / "report" / "plots" / "survival.png").is_file()
    medians = next(v for k, v in sections.items() if k.startswith("Pixels to failure: median"))
    for model, role in (("tiny", "base"), ("tiny-none", "control"), ("tiny-aug384", "augmented")):
        assert re.search(rf"^\| {model} \| {role}", medians, flags=re.M), medians
    # the worst case beside the random one (a sparse search up the ladder), base, control and augmented
    worst = next(v for k, v in sections.items() if k.startswith("Pixels to failure: random against worst case"))
    for model, role in (("tiny", "base"), ("tiny-none", "control"), ("tiny-aug384", "augmented")):
        assert re.search(rf"^\| {model} \| {role}", worst, flags=re.M), worst
    fail = pq.read_table(demo / "results" / "failure.parquet").to_pandas()
    clean = pq.read_table(demo / "results" / "clean.parquet").to_pandas()
    evaluated = {int(i) for i in (demo / "results" / "image_ids.txt").read_text().split()}  # filter "all": correct
    found = fail[(fail.target == "wrong") & (fail.kind == "worst_case")]
    assert (found.groupby("model").size() == 50).all() and (found.budget == 60).all() and len(found) == 150
    wrong = fail[(fail.target == "wrong") & (fail.kind == "random")]
    assert set(wrong.model) == set(clean.model) and wrong.n_fail_refined.notna().any()
    assert all(set(part.image_id) == evaluated for _, part in wrong.groupby("model"))
    restore = fail[fail.target == "right"].groupby(["model", "attack", "attack_params", "eps"]).size()
    assert restore.to_dict() == kept.to_dict()  # one row per kept example (one ladder)
    # the survival at each grid count that is a ladder point agrees with that cell's correct rate (intervals)
    from pixelray.report.survival import agreement

    cells = pq.read_table(demo / "results" / "cells.parquet").to_pandas()
    agree = agreement(fail, cells)
    assert sorted(set(agree["count"])) == [16, 64, 256, 512] and len(agree) == 12  # 384 is not a ladder point
    assert agree.agree.all(), agree


def test_plan_prints_the_work_and_refuses_what_the_sweep_refuses_with_the_same_line(synthetic_dataset, tmp_path):
    import tomli_w

    raw = {"data": {"path": str(synthetic_dataset)}, "models": {"names": ["tiny"], "weights": "none"},
           "eval": {"filter": "none", "batch_size": 100}, "grid": {"counts": [4, 8]},
           "experiment": [{"name": "f", "family": "pixels_to_failure", "max_count": 64}],
           "output": {"dir": str(tmp_path / "out")}}
    good = tmp_path / "good.toml"
    good.write_text(tomli_w.dumps(raw))
    result = invoke("plan", str(good))
    assert result.exit_code == 0, result.output
    # 600 images in 6 shards; filter "none": the clean and cells phases are exact (600 x 2 cells)
    assert re.search(r"^  clean +6 +600 +0 +6$", result.output, flags=re.M), result.output
    assert re.search(r"^  cells +6 +1,200 +0 +12 ", result.output, flags=re.M), result.output
    assert not (tmp_path / "out").exists()  # nothing written
    bound = int(re.search(r"^all models: <= ([\d,]+) images", result.output, flags=re.M)[1].replace(",", ""))
    for limit, refused in ((bound, False), (bound - 1, True)):  # [run] max_cost: the plan's bound decides
        good.write_text(tomli_w.dumps({**raw, "run": {"max_cost": limit}}))
        plan = invoke("plan", str(good))
        assert plan.exit_code == (2 if refused else 0) and "[run] max_cost" in plan.output, plan.output
        if refused:  # the sweep refuses it in the same line, before Ray or any file
            sweep = invoke("sweep", str(good))
            assert sweep.exit_code == 2 and sweep.stderr == plan.stderr and sweep.stderr.count("\n") == 1
            assert f"forwards up to {bound:,} images" in sweep.stderr
            assert not (tmp_path / "out").exists()
    # a time: from rates given (over the plan's figures), or from a pilot of the sweep's own units; one source
    good.write_text(tomli_w.dumps(raw))
    rated = invoke("plan", str(good), "--throughput", "tiny=1000:250", "--workers", "2")
    assert rated.exit_code == 0, rated.output
    images = int(re.search(r"^all models: <= ([\d,]+) images", rated.output, flags=re.M)[1].replace(",", ""))
    assert f"total {images / 1000:.1f} s of device time" in rated.output  # no attack: no gradient passes
    assert f"over 2 worker(s): about {images / 2000:.1f} s" in rated.output
    hours = images / 1000 / 3600  # [run] max_cost in device-hours, under the config's rates: the same line again
    for limit, refused in ((hours * 1.01, False), (hours * 0.99, True)):
        good.write_text(tomli_w.dumps({**raw, "run": {"max_cost": f"{limit:.9f} device-hours",
                                                      "throughput": ["tiny=1000"]}}))
        plan = invoke("plan", str(good))
        assert plan.exit_code == (2 if refused else 0), plan.output
        if refused:
            sweep = invoke("sweep", str(good))
            assert sweep.exit_code == 2 and sweep.stderr == plan.stderr and "device-hours under [run] throughput" \
                in sweep.stderr and not (tmp_path / "out").exists()
    good.write_text(tomli_w.dumps(raw))
    piloted = invoke("plan", str(good), "--calibrate", "--sample", "16")
    assert piloted.exit_code == 0 and "a pilot of the sweep's units" in piloted.output, piloted.output
    assert "over 16 image(s) of shard-00000.parquet" in piloted.output
    both = invoke("plan", str(good), "--calibrate", "--throughput", "5")
    assert both.exit_code == 2 and both.stderr.strip() == "error: --calibrate and --throughput: give one source of " \
        "the models' speed", both.stderr
    raw["experiment"][0]["max_count"] = 2000
    good.write_text(tomli_w.dumps(raw))
    plan, sweep = invoke("plan", str(good)), invoke("sweep", str(good))
    assert plan.exit_code == sweep.exit_code == 2
    assert plan.stderr == sweep.stderr and "max_count: 2000 is larger" in plan.stderr and plan.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
