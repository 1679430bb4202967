"""A new user's first commands (issue 21): each stumble fails at once in one line, or does the right thing.

Everything runs in-process and before Ray starts (a tripwire stands where a driver would join Ray), so
these tests take seconds: ``pixelray`` through typer's CliRunner, the Ray job entry points
(``jobs/*.py``) and ``cluster/local.py`` loaded from their files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
import typer
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.config.sweep import ConfigError, parse_config
from pixelray.config.tomlcheck import check_placeholder, refuse_lost_output

REPO = Path(__file__).resolve().parents[1]


def _load(relative: str):
    """A script of the repository (jobs/sweep.py, cluster/local.py) as a module."""
    name = "pixelray_test_" + re.sub(r"\W", "_", relative)
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_error(result, *needles: str) -> str:
    """The single ``error: ...`` line of a refused command (exit 2, no traceback); each needle in it."""
    assert result.exit_code == 2, (result.exit_code, repr(result.exception), result.output[-2000:])
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Joined(Exception):
    """Raised by the tripwire where a driver joins Ray."""


@pytest.fixture
def no_ray(monkeypatch):
    """Joining Ray raises :class:`Joined` (sweep and train-augment), so a test sees what happens before."""
    import pixelray.sweep
    import pixelray.sweep.driver as sweep_driver

    def tripwire(*_args, **_kwargs):
        raise Joined("the driver joined Ray")

    monkeypatch.setattr(sweep_driver, "connect", tripwire)
    monkeypatch.setattr(pixelray.sweep, "connect", tripwire)  # train-augment's driver imports it when it runs


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from pixelray.datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("entry") / "data"
    make_synthetic(root, classes=10, images=120, size=32, seed=0, rows_per_shard=120)
    return root


def _table10(data, out, *extra):
    """The user's command: jobs/table10.toml with the tiny CNN on local data."""
    return ["train-augment", str(REPO / "jobs" / "table10.toml"), "--model", "tiny", "--weights", "none",
            "--data", str(data), "--eval-data", str(data), "--images", "60", "--count", "4", "--epochs", "1",
            "--out", str(out), "--no-progress", *extra]


# ---------------------------------------------------------------------------- 1. use_gpu without a GPU


def test_train_augment_with_use_gpu_and_no_cuda_fails_at_once(small_data, tmp_path, monkeypatch, no_ray):
    """jobs/table10.toml says use_gpu = true: on a machine without CUDA the embedded Ray could never place
    a worker, and Ray Train used to wait for one forever, silently."""
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever it has
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    # as in a fresh `pixelray` process: no Ray yet (another test of the session may have started one here)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    t0 = time.monotonic()
    result = CliRunner().invoke(app, _table10(small_data, tmp_path / "run"), prog_name="pixelray")
    assert time.monotonic() - t0 < 10
    _one_line_error(result, "[run] use_gpu = true", "no CUDA GPU", "--cpu", "use_gpu = false")
    assert not (tmp_path / "run").exists()


def test_train_augment_cpu_flag_trains_on_cpu(small_data, tmp_path, monkeypatch, no_ray):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, _table10(small_data, tmp_path / "run", "--cpu"), prog_name="pixelray")
    assert isinstance(result.exception, Joined), result.output  # past every check: it would train now
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("training on CPU: 1 worker(s)"), lines


def test_a_cluster_without_gpus_or_an_autoscaler_is_refused(monkeypatch):
    import ray
    from ray._private.state import state

    from pixelray.errors import TrainError
    from pixelray.train.gpus import check_cluster_gpus

    said = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "memory": 1e9})
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    with pytest.raises(TrainError, match=r"has 0 of the 2 GPU\(s\).*no autoscaler can add any; pass --cpu"):
        check_cluster_gpus(2, said.append)
    check_cluster_gpus(0, said.append)  # use_gpu = false: no GPU needed
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"GPU": 1, "CPU": 64})
    with pytest.raises(TrainError, match="its autoscaler can reach only 1"):
        check_cluster_gpus(2, said.append)
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"GPU": 8, "CPU": 64})
    check_cluster_gpus(2, said.append)  # an autoscaler that can add them: it waits, and says so
    assert len(said) == 1 and "waiting for its autoscaler" in said[0]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    check_cluster_gpus(2, said.append)
    assert len(said) == 1


# ---------------------------------------------------------------------------- 2. relative output in a job


def _uploaded(tmp_path, monkeypatch) -> Path:
    """Run in a copy of the working directory as `ray job submit --working-dir` makes one, inside a job."""
    uploaded = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "pkg"
    uploaded.mkdir(parents=True)
    monkeypatch.chdir(uploaded)
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    return uploaded


def test_train_job_refuses_a_relative_output_that_ray_would_delete(small_data, tmp_path, monkeypatch, no_ray):
    job = _load("jobs/train_augment.py")
    uploaded = _uploaded(tmp_path, monkeypatch)
    raw = {"model": {"name": "tiny", "weights": "none"}, "data": {"path": str(small_data)},
           "augment": {"count": 4}, "train": {"epochs": 1}, "output": {"dir": "runs/x"}}
    (tmp_path / "train.toml").write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(job.app, ["--config", str(tmp_path / "train.toml")])
    _one_line_error(result, "[output] dir = 'runs/x' is relative", "Ray deletes", "absolute path", "or an s3:// URI")
    result = CliRunner().invoke(job.app, ["--smoke-test"])  # refused before its data and model are made
    _one_line_error(result, "'smoke-out/train-augment' is relative")
    assert "s3://" not in result.stderr  # the smoke test makes its data and model on a local disk
    assert list(uploaded.iterdir()) == []


def test_both_jobs_share_one_check():
    for script in ("jobs/sweep.py", "jobs/train_augment.py"):
        assert _load(script).refuse_lost_output is refuse_lost_output, script
    uploaded = Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_1")
    with pytest.raises(ConfigError, match="an s3:// URI"):
        refuse_lost_output("results/x", cwd=uploaded)
    refuse_lost_output("/shared/results/x", cwd=uploaded)
    refuse_lost_output("s3://bucket/x", cwd=uploaded)
    refuse_lost_output("results/x", cwd=Path("/home/me/pixelray"))  # by hand, in a checkout: kept


# ---------------------------------------------------------------------------- 3. the smoke test's folder


def test_sweep_smoke_test_uses_a_folder_of_its_own(tmp_path, monkeypatch):
    """Right after `make demo` (demo-out/ made with other sizes), the smoke test used to hit the demo's
    fine-tunes ("holds a run of another config")."""
    from pixelray.train.driver import TrainError

    job = _load("jobs/sweep.py")
    roots = []

    def prepare(root, **_kwargs):
        roots.append(Path(root))
        raise TrainError("stop here")

    monkeypatch.setattr(job, "prepare_demo", prepare)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _one_line_error(CliRunner().invoke(job.app, ["--smoke-test"]), "stop here")
    assert roots == [Path("smoke-out")]
    assert "demo-out" not in str(roots[0])


# ---------------------------------------------------------------------------- 4. weights of every config


def _sweep_raw(models, weights, **data):
    return {"data": {"path": "shards", **data}, "models": {"names": models, "weights": weights},
            "grid": {"counts": [4]}, "output": {"dir": "out"}}


@pytest.mark.parametrize("models", [["checkpoint:a.pt", "checkpoint:b.pt"], ["resnet18"]])
def test_an_unknown_weights_entry_is_refused_whatever_the_models(models):
    with pytest.raises(ConfigError, match=r"\[models\] weights = 'IMAGENET1K_V9'.*(no torchvision model|has no)"):
        parse_config(_sweep_raw(models, "IMAGENET1K_V9"))
    assert parse_config(_sweep_raw(models, "IMAGENET1K_V1")).weights == "IMAGENET1K_V1"


def test_the_cli_refuses_an_unknown_weights_entry_in_one_line(tmp_path, no_ray):
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps(_sweep_raw(["checkpoint:a.pt"], "IMAGENET1K_V9")))
    result = CliRunner().invoke(app, ["sweep", str(path)], prog_name="pixelray")
    _one_line_error(result, "[models] weights = 'IMAGENET1K_V9'", "no torchvision model has IMAGENET1K_V9")


# ---------------------------------------------------------------------------- 5. placeholders


def test_the_example_configs_placeholders_are_refused_before_any_network(tmp_path, monkeypatch, no_ray):
    import pixelray.sweep.driver as sweep_driver
    import pixelray.train.driver as train_driver

    def reached(*_args, **_kwargs):
        raise AssertionError("reached for the data")

    monkeypatch.setattr(sweep_driver, "load_manifest", reached)
    monkeypatch.setattr(train_driver, "plan_data", reached)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", str(REPO / "jobs" / "paper.toml")], prog_name="pixelray")
    _one_line_error(result, "[data] path = 's3://YOUR-BUCKET/imagenet-val-shards'", "replace the placeholder",
                    "--data")
    result = CliRunner().invoke(app, ["train-augment", str(REPO / "jobs" / "table10.toml")], prog_name="pixelray")
    _one_line_error(result, "[data] path = 's3://YOUR-BUCKET/imagenet-train-shards'", "replace the placeholder")
    result = CliRunner().invoke(app, ["train-augment", str(REPO / "jobs" / "table10.toml"), "--data", "d"],
                                prog_name="pixelray")
    _one_line_error(result, "[data] eval_path = 's3://YOUR-BUCKET/imagenet-val-shards'", "--eval-data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, placeholder", [
    ("s3://YOUR-BUCKET/shards", "YOUR-BUCKET"), ("/mnt/YOUR_DATA_DIR/x", "YOUR_DATA_DIR"),
    ("s3://<bucket>/shards", "<bucket>"), ("checkpoint:<path>", "<path>"),
    ("s3://your-bucket/shards", None), ("/data/YOURS/x", None), ("/data/MY-YOUR-X", None), ("results/paper", None),
])
def test_placeholders_are_told_from_paths(value, placeholder):
    if placeholder is None:
        check_placeholder(value, "[data] path")
    else:
        with pytest.raises(ConfigError, match=re.escape(f"{placeholder!r} is a placeholder; replace the placeholder")):
            check_placeholder(value, "[data] path", "--data")


# ---------------------------------------------------------------------------- 6. brackets in --help


def _commands(command, path=()):
    """(argv to the command, click command) of every command under ``command``."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_texts_keep_their_brackets():
    runner = CliRunner()
    out = runner.invoke(app, ["sweep", "--help"], prog_name="pixelray").output
    assert "(overrides [output] dir)" in out and "(overrides [data] path)" in out
    checked = 0
    for argv, command in _commands(typer.main.get_command(app)):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        tokens = {t for text in texts for t in re.findall(r"\[[a-z_]+\]", text)}
        if tokens:
            help_text = runner.invoke(app, [*argv, "--help"], prog_name="pixelray", terminal_width=200).output
            assert all(t in help_text for t in tokens), (argv, tokens, help_text)
            checked += 1
    assert checked >= 2
    for script in ("jobs/sweep.py", "jobs/train_augment.py"):
        out = runner.invoke(_load(script).app, ["--help"], terminal_width=200).output
        assert "[output] dir" in out and "[data] path" in out, (script, out)


# ---------------------------------------------------------------------------- 7, 8. cluster/local.py


def test_cluster_local_refuses_a_port_in_the_worker_port_range(monkeypatch, request):
    local = _load("cluster/local.py")
    monkeypatch.setattr(local.subprocess, "Popen", lambda *a, **k: pytest.fail("started Ray"))
    short = Path(tempfile.mkdtemp(prefix="pxt", dir="/tmp"))  # Ray's socket paths: --dir must be short
    state = short / "s"
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    result = CliRunner().invoke(local.app, ["start", "--dir", str(state), "--client-port", "10005"])
    _one_line_error(result, "CLUSTER_CLIENT_PORT=10005 in Ray's worker port range 10002..19999",
                    "CLUSTER_CLIENT_PORT=10001")
    result = CliRunner().invoke(local.app, ["start", "--dir", str(state), "--metrics-port", "6379"])
    _one_line_error(result, "CLUSTER_PORT and CLUSTER_METRICS_PORT are the same port (6379)")
    args = ["start", "--dir", str(state), "--port", "6400", "--min-worker-port", "6000", "--max-worker-port", "7000"]
    _one_line_error(CliRunner().invoke(local.app, args), "CLUSTER_PORT=6400 in Ray's worker port range 6000..7000")
    assert not state.exists()


def test_cluster_stop_takes_a_zombie_for_ended(tmp_path):
    """The head's process ended but its parent (here: this test, standing for a slow init) has not reaped it."""
    local = _load("cluster/local.py")
    state = tmp_path / "pxr"
    state.mkdir()
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--temp-dir={state / 'ray'}"],
                              start_new_session=True)
    try:
        (state / "head.pid").write_text(f"{leader.pid}\n")
        assert local._alive(leader.pid) and local._leader(local._paths(state)) == leader.pid
        t0 = time.monotonic()
        result = CliRunner().invoke(local.app, ["stop", "--dir", str(state), "--timeout", "6"])
        assert result.exit_code == 0, result.output
        assert "stopped the Ray head" in result.stdout and time.monotonic() - t0 < 3
        assert leader.poll() is not None or local._zombie(leader.pid)  # ended; reaped below, by its parent
        assert not (state / "head.pid").exists()
    finally:
        leader.kill()
        leader.wait()


# ---------------------------------------------------------------------------- 9. file modes


def test_written_files_are_world_readable_as_the_umask_allows(tmp_path):
    from pixelray.store.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic("x", tmp_path / "a.txt")
        os.umask(0o077)
        write_text_atomic("x", tmp_path / "b.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600  # the user's umask is respected


def test_report_html_is_world_readable(tmp_path):
    from report_fixtures import write_base_run

    from pixelray.report import write_report

    old = os.umask(0o022)
    try:
        base, _ = write_base_run(tmp_path / "runs")
        written = write_report([base], tmp_path / "report", ["html"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(written["html"].stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- 10. cell show with NumPy


@pytest.mark.parametrize("cell_id", ["n4-full-whole-all-per-image-seed0", "n4-a10-whole-all-per-image-seed0",
                                     "impulse_noise-sev1-seed0"])
def test_describe_cell_takes_a_numpy_image(cell_id):
    from pixelray.core.corrupt import describe_cell
    from pixelray.core.spec import Cell

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cell = Cell.from_id(cell_id, (32, 32))
    record = describe_cell(cell, 7, 32, 32, image)
    assert record == describe_cell(cell, 7, 32, 32, torch.from_numpy(image))
    assert record.old == tuple(int(image[y, x, c]) for y, x, c in zip(record.y, record.x, record.channel, strict=True))
    assert describe_cell(cell, 7, 32, 32, image.transpose(2, 0, 1)) == record  # (3, H, W) too
    with pytest.raises(ValueError, match=r"expected uint8 \(32, 32, 3\), got torch.float32"):
        describe_cell(cell, 7, 32, 32, image.astype(np.float32))


def test_the_batch_functions_say_they_want_a_torch_tensor():
    from pixelray.core.corrupt import apply_cell
    from pixelray.core.spec import Cell

    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"expected a torch.Tensor, got a numpy.ndarray; .*torch.from_numpy"):
        apply_cell(images, Cell.from_id("n4-full-whole-all-per-image-seed0", (32, 32)), [0, 1])


# ---------------------------------------------------------------------------- 11. the sweep job's options


def _options(command) -> dict[str, str | None]:
    """Option name -> help of a command's options (the flags of --progress/--no-progress each)."""
    options = [p for p in command.params if p.param_type_name == "option"]
    return {opt: p.help for p in options for opt in [*p.opts, *p.secondary_opts]}


def test_the_sweep_job_takes_the_options_of_pixelray_sweep():
    cli = _options(typer.main.get_command(app).commands["sweep"])
    job = _options(typer.main.get_command(_load("jobs/sweep.py").app))
    extra = {"--config", "--smoke-test", "--plan"}  # the job's own: its config is an option, its smoke test, and
    # --plan (`pixelray plan`, a command of its own)
    assert set(job) - extra == set(cli), (set(job) ^ set(cli)) - extra
    assert {k: v for k, v in job.items() if k not in extra} == cli  # the same definitions, the same help
    assert {"--metrics-linger", "--out", "--data", "--no-progress"} <= set(job)


@pytest.mark.parametrize(("have", "workers", "use_gpu", "reach", "runs", "at_once"), [
    ({"CPU": 16.0}, 1, False, 0, 5, 5),  # CPU fine-tunes: the cluster's CPUs over a fine-tune's
    ({"CPU": 2.0}, 1, False, 0, 5, 2),
    ({"CPU": 16.0}, 4, False, 0, 5, 4),  # four one-CPU workers each
    ({"CPU": 1.0}, 2, False, 0, 3, 1),  # never fewer than one
    ({"CPU": 8.0}, 1, True, 0, 5, 1),  # GPU fine-tunes and no GPU to reach: one (it waits, or was refused)
    ({"CPU": 8.0}, 1, True, 2, 5, 2),  # the GPUs present, or the autoscaler's published ceiling
    ({"CPU": 8.0}, 2, True, 5, 5, 2),  # DDP over two GPUs each
    ({"CPU": 8.0}, 1, True, math.inf, 5, 5),  # an autoscaler that does not say: every fine-tune asks
])
def test_fine_tunes_side_by_side_fill_what_the_cluster_has_or_can_add(monkeypatch, have, workers, use_gpu, reach,
                                                                     runs, at_once):
    import ray

    from pixelray.config.train import parse_train_config
    from pixelray.train.driver import side_by_side

    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(have))
    raw = {"model": {"name": "tiny"}, "data": {"path": "d"},
           "augment": {"aug": "pixels", "count": [4, 8, 16, 32, 64][:runs]},
           "run": {"workers": workers, "use_gpu": use_gpu}, "train": {"batch_size": 32}, "output": {"dir": "o"}}
    assert side_by_side(parse_train_config(raw).runs, reach) == at_once
