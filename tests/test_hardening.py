"""Nothing wrong is ever silent: one test per fault found by the hardening review (issue 12).

Each test failed on the code before the fix (checked by hand, see the closing note of
that change): a sidecar that runs code, two sweeps racing into one directory, path
traversal through a manifest, shards that do not match their manifest, a truncated unit
file, output and ``[run]`` problems found after Ray started, metrics that miss worker
deaths, a failed model load that leaves ``run.json`` behind, and ``pixel-index`` options.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import sweep_command, unit_files, wait_for
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.config.sweep import parse_config
from pixelray.models import load_model, save_checkpoint, sidecar_path
from pixelray.shards import ShardWriter, check_dataset, load_manifest, read_shard
from pixelray.sweep import SweepError, run_sweep

GRID = {"counts": [8, 200], "amplitudes": ["full", 60]}
VERSIONS = ["pixelray_version", "torch_version"]


def raw_config(data, models, out, grid=GRID, **run):
    return {
        "data": {"path": str(data)},
        "models": {"names": list(models), "weights": "none"},
        "eval": {"filter": "all", "batch_size": 64, "size": 100},
        "grid": dict(grid),
        "output": {"dir": str(out)},
        "run": {"threads": 2, **run},
    }


def config(data, models, out, grid=GRID, **run):
    return parse_config(raw_config(data, models, out, grid, **run))


def _write_toml(raw, path):
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


def _comparable(df):
    return df.drop(columns=VERSIONS).reset_index(drop=True)


def _copy_dataset(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _rewrite_manifest(root: Path, edit) -> None:
    body = json.loads((root / "manifest.json").read_text())
    edit(body)
    (root / "manifest.json").write_text(json.dumps(body))


# ---------------------------------------------------------------------------- 1. sidecars run no code


EVIL = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("imported")

def make(num_classes=10):
    import torch
    pathlib.Path(__file__).with_name("called").write_text("called")
    return torch.nn.Linear(3, num_classes)
"""


@pytest.mark.parametrize("base", ["evilmod:make", "tempfile:mkdtemp", "os.path:join"])
def test_a_checkpoint_sidecar_cannot_name_code_to_import_or_call(tmp_path, monkeypatch, base):
    (tmp_path / "evilmod.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, as from the driver's working directory
    monkeypatch.chdir(tmp_path)
    path = save_checkpoint(load_model("tiny", None, num_classes=10), tmp_path / "m.pt", base="tiny")
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    meta["base"] = base
    side.write_text(json.dumps(meta))
    temp_before = set(os.listdir(tempfile_dir()))
    with pytest.raises(ValueError, match=rf"base {base!r} is not a built-in architecture"):
        load_model(f"checkpoint:{path}")
    assert not (tmp_path / "imported").exists() and not (tmp_path / "called").exists()
    assert "evilmod" not in sys.modules
    assert set(os.listdir(tempfile_dir())) == temp_before  # tempfile.mkdtemp was not called


def tempfile_dir():
    import tempfile

    return tempfile.gettempdir()


def test_saving_a_checkpoint_with_a_factory_base_is_refused(tmp_path):
    model = load_model("tiny", None, num_classes=10)
    with pytest.raises(ValueError, match="built-in architecture"):
        save_checkpoint(model, tmp_path / "m.pt", base="evilmod:make")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- 2. one run per directory


@pytest.mark.slow
def test_two_configs_racing_into_one_directory_one_runs_the_other_is_refused(
    ray_local, synthetic_dataset, tiny_checkpoints, tmp_path
):
    out = tmp_path / "out"
    configs = [
        _write_toml(raw_config(synthetic_dataset, tiny_checkpoints, out, grid=grid), tmp_path / f"c{i}.toml")
        for i, grid in enumerate([{"counts": [8, 200]}, {"counts": [16, 300], "amplitudes": [60]}])
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    procs = [
        subprocess.Popen(sweep_command(c, ray_local), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for c in configs
    ]
    results = [(p.wait(600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    winner = next(i for i, r in enumerate(results) if r[0] == 0)
    loser_err = results[1 - winner][2].strip().splitlines()
    assert len(loser_err) == 1 and "is in use by another run" in loser_err[0], loser_err
    assert "Traceback" not in results[1 - winner][2]
    assert not (out / "run.lock").exists(), "the winner releases its lock"
    run = json.loads((out / "run.json").read_text())
    solo = run_sweep(parse_config(json.loads(json.dumps(_load_toml(configs[winner]))),
                                  overrides={"output_dir": str(tmp_path / "solo")}), progress=False)
    df = pd.read_parquet(out / "cells.parquet")
    assert set(df.config_hash) == {run["config_hash"]}
    pd.testing.assert_frame_equal(_comparable(df), _comparable(pd.read_parquet(solo.cells_path)))


def _load_toml(path):
    import tomllib

    return tomllib.loads(Path(path).read_text())


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(synthetic_dataset, tiny_checkpoints, tmp_path):
    """A lock held by a live process refuses the sweep; one left by a dead process is taken over with a message."""
    from pixelray.store.rundir import RunDir

    out = tmp_path / "out"
    cfg = config(synthetic_dataset, tiny_checkpoints, out)
    holder = RunDir(out)
    holder.claim("0123456789abcdef")
    try:
        with pytest.raises(SweepError, match=r"is in use by another run \(config 0123456789abcdef, pid "):
            run_sweep(cfg, progress=False)
    finally:
        holder.abandon()  # removes the folder it made, which works only if it holds nothing else
    assert not out.exists(), "a refused sweep writes nothing"
    # a lock file from a process that died without releasing it (SIGKILL)
    child = subprocess.run(
        [sys.executable, "-c", "import os, sys; from pixelray.store.rundir import RunDir; "
         f"RunDir({str(out)!r}).claim('fedcba9876543210'); os.kill(os.getpid(), 9)"], timeout=120)
    assert child.returncode == -signal.SIGKILL and (out / "run.lock").exists()
    messages = []
    RunDir(out, log=messages.append).claim(cfg.config_hash)
    assert any("stale lock" in m and "fedcba9876543210" in m for m in messages), messages


def test_a_directory_another_run_creates_between_look_and_mkdir_is_used_not_refused(tmp_path, monkeypatch):
    """Two runs racing into a missing directory: both see it missing, one mkdir wins. The other's
    mkdir meets the folder (EEXIST) and goes on to the lock, which decides; it does not own the folder."""
    from pixelray.store import rundir

    out = tmp_path / "a" / "out"
    seen = rundir._first_existing(out.absolute())  # what the loser saw: both folders missing
    assert seen[1] == [tmp_path / "a", out]

    def racing(path):  # ... and then the winner made them, before the loser's mkdir
        out.mkdir(parents=True, exist_ok=True)
        return seen

    monkeypatch.setattr(rundir, "_first_existing", racing)
    loser = rundir.RunDir(out)
    loser.claim("0123456789abcdef")
    assert loser._created == [] and (out / "run.lock").exists()
    loser.abandon()
    assert out.is_dir(), "the folders were the winner's: the loser leaves them"


# ---------------------------------------------------------------------------- 3. path traversal


def test_a_manifest_cannot_point_outside_the_data_root(synthetic_dataset, tiny_checkpoints, tmp_path):
    root = _copy_dataset(synthetic_dataset, tmp_path / "data" / "set")
    outside = tmp_path / "data" / "outside"
    outside.mkdir()
    os.replace(root / "shard-00005.parquet", outside / "shard-00005.parquet")
    _rewrite_manifest(root, lambda b: b["shards"][5].update(file="..%2Foutside%2Fshard-00005.parquet"))
    uri = "file://" + str(root)
    with pytest.raises(SweepError, match=r"\.\.%2Foutside%2Fshard-00005\.parquet.*outside the data set root"):
        run_sweep(config(uri, tiny_checkpoints, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    problems = check_dataset(uri)
    assert any("outside the data set root" in p for p in problems), problems


# ---------------------------------------------------------------------------- 4. shards against the manifest


def _shard_with(src: Path, dst_dir: Path, images=None, size=None) -> Path:
    """A copy of shard ``src`` re-encoded (optionally with other images), as written by ShardWriter."""
    batch = read_shard(str(src))
    imgs = batch.images.numpy() if images is None else images
    with ShardWriter(dst_dir, name="x", height=imgs.shape[1], width=imgs.shape[2],
                     class_names=[str(i) for i in range(10)], source="test", rows_per_shard=len(imgs)) as w:
        w.add(batch.image_ids.numpy(), batch.labels.numpy(), imgs, [""] * len(imgs))
    return dst_dir / "shard-00000.parquet"


def _one_pixel_changed(root, tmp):
    shard = root / "shard-00003.parquet"
    images = read_shard(str(shard)).images.numpy().copy()
    images[7, 5, 5, 0] ^= 0xFF
    os.replace(_shard_with(shard, tmp / "re", images=images), shard)
    return "shard-00003.parquet: sha256"


def _replaced_by_another(root, tmp):
    shutil.copy(root / "shard-00001.parquet", root / "shard-00002.parquet")
    return "shard-00002.parquet: image_id range 100..199 differs from the manifest's 200..299"


def _smaller_images(root, tmp):
    shard = root / "shard-00004.parquet"
    small = read_shard(str(shard)).images.numpy()[:, ::2, ::2].copy()
    os.replace(_shard_with(shard, tmp / "re", images=small), shard)
    return "shard-00004.parquet: image shape 16x16x3 differs from the manifest's 32x32x3"


@pytest.mark.slow
@pytest.mark.parametrize("fault", [_one_pixel_changed, _replaced_by_another, _smaller_images])
def test_a_shard_that_does_not_match_its_manifest_fails_the_sweep(
    ray_local, synthetic_dataset, tiny_checkpoints, tmp_path, fault
):
    root = _copy_dataset(synthetic_dataset, tmp_path / "data")
    message = fault(root, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SweepError) as info:
        run_sweep(config(root, tiny_checkpoints, out), progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (out / "cells.parquet").exists()


# ---------------------------------------------------------------------------- 5. unit files that cannot be trusted


@pytest.fixture(scope="module")
def reference(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run_sweep(config(synthetic_dataset, tiny_checkpoints, out / "run"), progress=False)
    return out / "run", pd.read_parquet(result.cells_path)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["clean", "cells"])
def test_a_truncated_unit_file_is_moved_aside_and_recomputed(
    ray_local, synthetic_dataset, tiny_checkpoints, reference, tmp_path, phase
):
    ref_dir, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_dir, out)
    (out / "cells.parquet").unlink()
    victim = unit_files(out, phase)[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a crash or a full disk
    messages = []
    result = run_sweep(config(synthetic_dataset, tiny_checkpoints, out), progress=False, log=messages.append)
    assert any(str(victim) in m and "recomputing" in m for m in messages), messages
    assert result.stats["units_run"][phase] == 1
    assert list((out / "rejected").rglob(f"{victim.stem}.*")), "the bad file is kept aside for inspection"
    pd.testing.assert_frame_equal(_comparable(pd.read_parquet(result.cells_path)), _comparable(ref))


@pytest.mark.slow
def test_unit_files_of_another_plan_are_not_used(ray_local, synthetic_dataset, tiny_checkpoints, reference, tmp_path):
    """Cells unit files written for another config (here: another eval size) are recomputed, not summed in."""
    import dataclasses

    _, ref = reference
    other = tmp_path / "other"
    run_sweep(dataclasses.replace(config(synthetic_dataset, tiny_checkpoints, other), eval_size=50), progress=False)
    out = tmp_path / "out"
    foreign = unit_files(other, "cells")
    for f in foreign:
        dest = out / f.relative_to(other)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    messages = []
    result = run_sweep(config(synthetic_dataset, tiny_checkpoints, out), progress=False, log=messages.append)
    assert result.stats["units_run"]["cells"] == len(unit_files(out, "cells")) > len(foreign), messages
    rejected = list((out / "rejected").rglob("*.parquet"))
    assert sum("another plan" in m for m in messages) == len(foreign) == len(rejected), messages
    pd.testing.assert_frame_equal(_comparable(pd.read_parquet(result.cells_path)), _comparable(ref))


# ---------------------------------------------------------------------------- 6. checked before Ray starts


def _before_ray_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    return busy, [
        ("out is a file", {"out": a_file}, [], f"{a_file} is a file, not a directory"),
        ("out under a file", {"out": a_file / "sub"}, [], f"{a_file} is a file"),
        ("out not writable", {"out": Path("/proc/pixelray-out")}, [], "/proc/pixelray-out: cannot create"),
        ("workers -1", {"workers": -1}, [], "[run] workers = -1: must be an integer >= 1"),
        ("threads -1", {"threads": -1}, [], "[run] threads = -1: must be an integer >= 1"),
        ("metrics port 70000", {"metrics_port": 70000}, [], "[run] metrics_port = 70000: must be in 0..65535"),
        ("metrics port in use", {}, ["--metrics-port", str(port)], f"127.0.0.1:{port} is in use"),
    ]


def test_output_and_run_problems_are_refused_before_ray_starts(synthetic_dataset, tiny_checkpoints, tmp_path,
                                                                monkeypatch):
    """The CLI in-process, with a tripwire where the driver joins Ray: a check made after joining Ray
    would trip it (one line, but not the check's message) instead of giving the message."""
    import pixelray.sweep.driver as driver

    def tripwire(*_args, **_kwargs):
        raise AssertionError("joined Ray before the check")

    monkeypatch.setattr(driver, "connect", tripwire)
    busy, cases = _before_ray_cases(tmp_path)
    try:
        for i, (name, run, args, message) in enumerate(cases):
            out = run.pop("out", tmp_path / f"out{i}")
            raw = raw_config(synthetic_dataset, tiny_checkpoints, out, **run)
            path = _write_toml(raw, tmp_path / f"case{i}.toml")
            result = CliRunner().invoke(app, ["sweep", str(path), "--no-progress", *args], prog_name="pixelray")
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 2, (name, result.exit_code, repr(result.exception), result.output[-2000:])
            assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error: "), (name, lines)
        for i in range(len(cases)):
            assert not (tmp_path / f"out{i}").exists()
    finally:
        busy.close()


# ---------------------------------------------------------------------------- 7. metrics a dashboard can trust


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
            else:
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(
                    bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))))
    return found


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # loopback only
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_worker_deaths_are_counted_and_the_final_state_is_scrapeable(
    ray_local, synthetic_dataset, tiny_checkpoints, reference, tmp_path
):
    import ray

    _, ref = reference
    out = tmp_path / "out"
    cfg = config(synthetic_dataset, tiny_checkpoints, out, metrics_port=0, metrics_linger=4)  # scraped at once
    messages, box = [], {}

    def target():
        try:
            box["result"] = run_sweep(cfg, progress=False, log=messages.append)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert wait_for(lambda: len(unit_files(out)) >= 1), (box, messages)
    assert not (out / "cells.parquet").exists(), "the sweep finished before the kill; make it longer"
    port = int(next(m for m in messages if m.startswith("metrics: ")).rsplit(":", 1)[1].split("/")[0])
    assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only, read from the kernel's socket table
    first = _scrape(port)
    workers = [n for n in ray.util.list_named_actors() if n.startswith(f"pixelray-worker-{os.getpid()}")]
    os.kill(ray.get(ray.get_actor(workers[0]).ping.remote())["pid"], signal.SIGKILL)
    assert wait_for(lambda: (out / "stats.json").exists(), timeout=300), (box, messages)
    final = _scrape(port)  # lingering: the endpoint outlives the final tables
    done = ("pixelray_units_done_total", (("phase", "cells"),))
    assert final[done] > first.get(done, 0)  # the counters moved during the run
    images = sum(v for (name, _), v in final.items() if name == "pixelray_images_evaluated_total")
    assert images > sum(v for (name, _), v in first.items() if name == "pixelray_images_evaluated_total")
    assert final[("pixelray_units_failed_total", ())] >= 1
    assert final[("pixelray_worker_restarts_total", ())] >= 1
    for phase in ("clean", "cells"):
        key = (("phase", phase),)
        assert final[("pixelray_units_done_total", key)] == final[("pixelray_units_total", key)] > 0
    thread.join(120)
    assert "error" not in box, box.get("error")
    pd.testing.assert_frame_equal(_comparable(pd.read_parquet(out / "cells.parquet")), _comparable(ref))


# ---------------------------------------------------------------------------- 8. a failed preflight writes nothing


@pytest.mark.slow
def test_a_model_that_fails_to_load_leaves_nothing_and_the_corrected_config_runs(
    ray_local, synthetic_dataset, tiny_checkpoints, tmp_path
):
    broken = tmp_path / "broken.pt"
    good = Path(tiny_checkpoints[0].split(":", 1)[1])
    shutil.copy(good, broken)
    shutil.copy(sidecar_path(good), broken.with_name(broken.name + ".json"))
    broken.write_bytes(b"not a state_dict at all")
    out = tmp_path / "out"
    with pytest.raises(SweepError, match="broken.pt"):
        run_sweep(config(synthetic_dataset, [f"checkpoint:{broken}"], out), progress=False)
    assert not out.exists()
    result = run_sweep(config(synthetic_dataset, tiny_checkpoints[:1], out), progress=False)
    assert len(pd.read_parquet(result.cells_path)) == 4


def test_a_model_for_another_number_of_classes_is_refused_before_anything_is_written(
    ray_local, synthetic_dataset, tmp_path
):
    path = save_checkpoint(load_model("tiny", None, num_classes=7), tmp_path / "seven.pt", base="tiny")
    out = tmp_path / "out"
    with pytest.raises(SweepError, match="predicts 7 classes but the data set has 10"):
        run_sweep(config(synthetic_dataset, [f"checkpoint:{path}"], out), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------- 9. pixel-index options


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "-1", "--count", "1"], "--size -1: must be an integer >= 1"),
    (["--size", "0", "--count", "1"], "--size 0: must be an integer >= 1"),
    (["--images", "0"], "--images 0: must be an integer >= 1"),
    (["--wrong", "-3"], "--wrong -3: must be in 0..--images"),
    (["--wrong", "11", "--images", "10"], "--wrong 11: must be in 0..--images (10)"),
    (["--count", "0"], "count: 0 is invalid"),
    (["--count", "60000"], "count: 60000 is larger than"),
])
def test_pixel_index_validates_every_option(args, message):
    base = {"--wrong": "1", "--images": "100", "--count": "4"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["pixel-index", *[x for kv in base.items() for x in kv]]
    result = CliRunner().invoke(app, argv, prog_name="pixelray")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert result.stdout == ""


def test_reading_a_shard_checks_it_against_its_manifest_entry(synthetic_dataset, tmp_path):
    """The worker's reader: rows, shape, id range, labels and sha256 (when asked), one line naming the shard."""
    from pixelray.shards import ShardError, ShardExpectation

    manifest = load_manifest(synthetic_dataset)
    info = manifest.shards[1]
    uri = os.path.join(synthetic_dataset, info.file)
    expect = ShardExpectation.of(manifest, info, sha256=True)
    assert len(read_shard(uri, expect=expect)) == info.rows
    first = ShardExpectation.of(manifest, manifest.shards[0])
    wrong = [
        (first, "image_id range 100..199 differs from the manifest's 0..99"),
        (expect.replace(rows=99), "100 rows, but the manifest says 99"),
        (expect.replace(shape=(16, 16, 3)), "image shape 32x32x3 differs from the manifest's 16x16x3"),
        (expect.replace(num_classes=3), "labels 3..9 outside 0..2"),
        (expect.replace(sha256="0" * 64), "sha256 "),
    ]
    for bad, message in wrong:
        with pytest.raises(ShardError) as info_:
            read_shard(uri, expect=bad)
        assert message in str(info_.value) and info.file in str(info_.value) and "\n" not in str(info_.value)
    assert read_shard(uri, image_ids=[150, 120], expect=expect).image_ids.tolist() == [120, 150]
    assert pq.read_metadata(uri).num_rows == info.rows
