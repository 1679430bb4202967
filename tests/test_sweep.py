"""The grid sweep on a real local Ray: exact counts, fault tolerance, resume, no re-reads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import unit_files, wait_for
from reference_perturb import apply_pixel_changes

from pixelray.config.sweep import ConfigError, parse_config
from pixelray.core.spec import Cell, PixelChange
from pixelray.models import load_model
from pixelray.shards import load_manifest, read_shard, shard_uris
from pixelray.sweep import SweepError, run_sweep

GRID = {"counts": [8, 64, 200], "amplitudes": ["full", 60], "areas": [32, 16]}


def make_config(data, models, out, grid=GRID, **eval_):
    raw = {
        "data": {"path": str(data)},
        "models": {"names": list(models), "weights": "none"},
        "eval": {"filter": "all", "batch_size": 64, **eval_},
        "grid": grid,
        "output": {"dir": str(out)},
        "run": {"threads": 2},
    }
    return parse_config(raw)


def plain_loop(data, models, cells, size):
    """Independent reference: no Ray, one image at a time, the pixel changes drawn by tests/reference_perturb.py
    (the frozen copy of the draws, not the engine under test); pixelray only reads the shards and runs the models."""
    ids, labels, images = [], [], []
    for uri in shard_uris(str(data)):
        b = read_shard(uri)
        ids += b.image_ids.tolist()
        labels += b.labels.tolist()
        images += list(b.images)
    nets = {m: load_model(m, None) for m in models}
    with torch.inference_mode():
        batch, truth = torch.stack(images), torch.tensor(labels)
        ok = torch.stack([nets[m](batch).argmax(1) == truth for m in models]).all(0).tolist()
        chosen = sorted(i for i, good in zip(ids, ok, strict=True) if good)[:size]
        index = {i: k for k, i in enumerate(ids)}
        wrong = {}
        for m in models:
            for cell in cells:
                n = 0
                for i in chosen:
                    k = index[i]
                    changed = apply_pixel_changes(images[k][None], cell, [i])
                    n += int(nets[m](changed).argmax()) != labels[k]
                wrong[(m, cell.cell_id)] = (len(chosen), n)
    return wrong


def cell_of(row):
    amp = row.amplitude if row.amplitude == "full" else int(row.amplitude)
    area = None if row.area == 32 else int(row.area)
    return Cell(PixelChange(int(row["count"]), amp, area), int(row.seed))


@pytest.mark.slow
def test_counts_equal_an_independent_plain_loop(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path):
    cfg = make_config(synthetic_dataset, tiny_checkpoints, tmp_path / "out", size=100)
    result = run_sweep(cfg, progress=False)
    df = pd.read_parquet(result.cells_path)
    assert len(df) == 2 * 12
    assert not df.duplicated(["model", "count", "amplitude", "area"]).any()
    expected = plain_loop(synthetic_dataset, tiny_checkpoints, cfg.unique_cells((32, 32)), 100)
    got = {(r.model, cell_of(r).cell_id): (r.n_images, r.n_wrong) for _, r in df.iterrows()}
    assert got == expected
    assert df.n_wrong.sum() > 0  # the grid does damage: a test that can fail
    # the results schema, typed
    assert list(df.columns)[:3] == ["experiment", "model", "weights"]
    assert df.pixel_index.notna().all() and (df.ci_low <= df.wrong_rate).all()
    ids = (tmp_path / "out" / "image_ids.txt").read_text().split()
    assert len(ids) == 100 and ids == sorted(ids, key=int)
    clean = pd.read_parquet(result.clean_path)
    assert set(clean.columns) >= {"model", "image_id", "label", "prediction", "correct"}
    assert len(clean) == 2 * load_manifest(str(synthetic_dataset)).num_images


@pytest.mark.slow
def test_reads_do_not_grow_with_the_grid(ray_local, synthetic_dataset, tiny_checkpoints, reference, tmp_path):
    # The plan from sources the sweep does not compute: the shard files on disk, the models this
    # test names. ``reads`` are counted in the workers' reader (every read_shard call), ``units_run``
    # in the driver; the unit files on disk are a third count.
    n_shards = len(list(Path(synthetic_dataset).glob("*.parquet")))
    plan = {"clean": n_shards * len(tiny_checkpoints), "cells": n_shards * len(tiny_checkpoints)}
    assert n_shards == 6
    small = run_sweep(make_config(synthetic_dataset, tiny_checkpoints, tmp_path / "small", grid={"counts": [4]}),
                      progress=False)
    runs = {"small": (small.stats, tmp_path / "small"), "big": (reference_stats, reference_stats["out"])}  # GRID
    for name, (stats, out) in runs.items():
        assert stats["reads"] == plan, name
        assert stats["units_run"] == plan, name
        assert {phase: len(unit_files(out, phase)) for phase in plan} == plan, name



def _sweep_in_thread(cfg):
    box = {}

    def target():
        try:
            box["result"] = run_sweep(cfg, progress=False)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box



@pytest.fixture(scope="module")
def reference(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run_sweep(make_config(synthetic_dataset, tiny_checkpoints, out), progress=False)
    reference_stats.update(result.stats, out=out)
    return pd.read_parquet(result.cells_path)


#: The reference sweep's stats and output directory (GRID, every image): the "big" grid of the reads test.
reference_stats: dict = {}


def _comparable(df):
    return df.drop(columns=["pixelray_version", "torch_version"]).reset_index(drop=True)


@pytest.mark.slow
def test_killing_a_worker_changes_nothing(ray_local, synthetic_dataset, tiny_checkpoints, reference, tmp_path):
    """Two deaths in one sweep: its worker killed through Ray (``ray.kill``), then its replacement by the
    kernel (SIGKILL). Each time the unit in flight goes back to the queue and a new worker takes it."""
    import ray

    out = tmp_path / "out"
    cfg = make_config(synthetic_dataset, tiny_checkpoints, out)
    thread, box = _sweep_in_thread(cfg)
    killed: set[str] = set()
    done_at_kill = 0

    def alive() -> list[str]:
        return [n for n in ray.util.list_named_actors() if n.startswith(f"pixelray-worker-{os.getpid()}")
                and n not in killed]

    for how in ("ray.kill", "SIGKILL"):
        # units written since the last kill, and a worker not killed (the replacement, the second time)
        assert wait_for(lambda: len(unit_files(out)) > done_at_kill and alive()), box  # noqa: B023 - called at once
        assert not (out / "cells.parquet").exists(), "the sweep finished before the kill; make it longer"
        names = alive()
        assert len(names) == 1, (names, killed)
        killed.add(names[0])
        actor = ray.get_actor(names[0])
        if how == "ray.kill":
            ray.kill(actor, no_restart=True)
        else:
            os.kill(ray.get(actor.ping.remote())["pid"], signal.SIGKILL)
        done_at_kill = len(unit_files(out))
    thread.join(300)
    assert "error" not in box, box.get("error")
    df = pd.read_parquet(out / "cells.parquet")
    assert not df.duplicated(["experiment", "model", "count", "amplitude", "area", "seed"]).any()
    pd.testing.assert_frame_equal(_comparable(df), _comparable(reference))
    assert len(unit_files(out)) == len(unit_files(out, "clean")) == 2 * len(shard_uris(str(synthetic_dataset)))
    assert box["result"].stats["workers"]["restarts"] == 2


def _write_toml(cfg_dict, path):
    import tomli_w

    path.write_text(tomli_w.dumps(cfg_dict))
    return path


# A driver killed mid-sweep and run again: tests/test_attack_sweep.py (killed twice, in every phase).


def test_another_config_in_the_same_directory_is_refused(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"config_hash": "0123456789abcdef"}')
    with pytest.raises(SweepError, match="another config"):
        run_sweep(make_config(synthetic_dataset, tiny_checkpoints, out, grid={"counts": [2]}), progress=False)


def test_a_cell_that_does_not_fit_the_images_is_refused_before_work(synthetic_dataset, tiny_checkpoints, tmp_path):
    cfg = make_config(synthetic_dataset, tiny_checkpoints, tmp_path / "out", grid={"counts": [4], "areas": [64]})
    with pytest.raises(ConfigError, match="area: 64 is larger than the image"):
        run_sweep(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_weights_fail_before_any_unit(ray_local, synthetic_dataset, tmp_path, monkeypatch):
    cfg = parse_config({
        "data": {"path": str(synthetic_dataset)},
        "models": {"names": ["squeezenet1_1", f"checkpoint:{tmp_path / 'nope.pt'}"], "weights": "none"},
        "grid": {"counts": [4]}, "output": {"dir": str(tmp_path / "out")},
    })
    with pytest.raises(SweepError, match="nope.pt"):
        run_sweep(cfg, progress=False)
    assert not (tmp_path / "out").exists()  # no partial output


def test_a_job_refuses_a_relative_output_that_ray_would_delete(synthetic_dataset, tiny_checkpoints, tmp_path):
    """Inside an uploaded working directory (ray job submit --working-dir), a relative --out would be lost."""
    repo = Path(__file__).resolve().parents[1]
    uploaded = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "pkg"
    uploaded.mkdir(parents=True)
    raw = {"data": {"path": str(synthetic_dataset)}, "models": {"names": list(tiny_checkpoints), "weights": "none"},
           "grid": {"counts": [4]}, "output": {"dir": "results/x"}}
    config = _write_toml(raw, tmp_path / "job.toml")
    env = {**os.environ, "RAY_JOB_ID": "02000000", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, str(repo / "jobs" / "sweep.py"), "--config", str(config)], cwd=uploaded,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[output] dir = 'results/x' is relative" in done.stderr and "Traceback" not in done.stderr
    assert not (uploaded / "results").exists()


def test_cpu_workers_reserve_the_cores_they_use(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path):
    import ray

    from pixelray.sweep.pool import WorkerPool, reserved_cpus
    from pixelray.telemetry import SweepTelemetry

    assert (reserved_cpus("cpu", 1), reserved_cpus("cpu", 2), reserved_cpus("cuda", 8)) == (1, 2, 1)
    assert reserved_cpus("cpu", 64) == 2  # never more than a node has: it could not be placed
    cfg = make_config(synthetic_dataset, tiny_checkpoints, tmp_path / "out")  # threads = 2
    total = ray.cluster_resources()["CPU"]
    pool = WorkerPool(cfg, SweepTelemetry(progress=False))
    try:
        ray.get(pool.workers[0].handle.ping.remote())
        assert pool.options["num_cpus"] == cfg.threads == 2
        # the running actor holds its two CPUs (Ray's own accounting)
        assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total - 2, timeout=30)
    finally:
        pool.shutdown()
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total, timeout=60)


# The rules, as the cluster issue states them: GPUs present are used; where the autoscaler can add GPU nodes,
# auto and cuda wait for them; where none can ever come, cuda fails at once and auto computes on CPU, saying so.
DEVICE_CASES = [
    # device, gpus, (now, most, embedded[, autoscaler]) -> device, words of the note (None: no note) or the error
    ("cpu", None, (0, None, True), "cpu", None),
    ("cpu", None, (4, 8, False), "cpu", None),
    ("auto", None, (2, None, False), "cuda", None),
    ("cuda", 3, (1, None, False), "cuda", None),
    ("auto", None, (0, 8, False), "cuda", "waiting for the autoscaler to add GPU nodes (up to 8 GPUs"),
    ("cuda", None, (0, 8, False), "cuda", "waiting for the autoscaler to add GPU nodes (up to 8 GPUs"),
    ("auto", "all", (0, 3, False), "cuda", "[run] device = 'auto', gpus = 'all': no GPU in the cluster yet"),
    ("auto", None, (0, None, True), "cpu", "embedded Ray (no cluster, no autoscaler) has no GPU: computing on CPU"),
    ("auto", None, (0, 0, False), "cpu", "its autoscaler has no GPU node type: computing on CPU"),
    ("auto", None, (0, None, False), "cpu", "the Ray cluster has no GPU now: computing on CPU"),
    ("cuda", None, (0, None, False), "cuda", "waiting up to 600 s ([run] placement_timeout)"),
    ("cuda", None, (0, None, True), SweepError, "[run] device = 'cuda': this embedded Ray"),
    # auto never fails for want of a GPU: [run] gpus sizes the pool only where it is on GPUs
    ("auto", 2, (0, 0, False), "cpu", "[run] device = 'auto', gpus = 2: the Ray cluster has no GPU and its autoscaler"),
    ("auto", "1..8", (0, None, True), "cpu", "gpus = '1..8': this embedded Ray (no cluster, no autoscaler) has no"),
    ("cuda", 2, (0, 0, False), SweepError, "[run] device = 'cuda', gpus = 2: the Ray cluster has no GPU and its"),
    # an autoscaler that runs but does not publish its node types (v1): the pending workers ask
    ("auto", None, (0, None, False, True), "cuda", "GPU nodes (it does not say how many it can add; [run] placement"),
    ("auto", "1..3", (0, None, False, True), "cuda", "gpus = '1..3': no GPU in the cluster yet; waiting"),
    ("cuda", None, (0, None, True, True), SweepError, "[run] device = 'cuda': this embedded Ray"),
]


@pytest.mark.parametrize(("device", "gpus", "outlook", "chosen", "words"), DEVICE_CASES)
def test_the_device_follows_what_the_cluster_has_and_can_get(device, gpus, outlook, chosen, words):
    from pixelray.sweep.devices import GpuOutlook, choose_device

    if chosen is SweepError:
        with pytest.raises(SweepError, match=re.escape(words)) as err:
            choose_device(device, gpus, GpuOutlook(*outlook), 600)
        assert "\n" not in str(err.value) and "set device = 'cpu'" in str(err.value)
        return
    got, note = choose_device(device, gpus, GpuOutlook(*outlook), 600)
    assert got == chosen
    assert note is None if words is None else (words in note and "\n" not in note), note


def test_cuda_on_an_embedded_ray_without_a_gpu_fails_at_once_in_one_line(ray_local, synthetic_dataset,
                                                                         tiny_checkpoints, tmp_path):
    """The session's Ray is this process's own (no autoscaler, no GPU): `cuda` can never be placed there."""
    import tomli_w
    from typer.testing import CliRunner

    from pixelray.cli import app
    from pixelray.sweep.devices import GpuOutlook, gpu_outlook

    assert gpu_outlook() == GpuOutlook(now=0, most=None, embedded=True)
    raw = {"data": {"path": synthetic_dataset}, "models": {"names": tiny_checkpoints[:1], "weights": "none"},
           "grid": {"counts": [4]}, "output": {"dir": str(tmp_path / "out")}, "run": {"device": "cuda"}}
    (tmp_path / "c.toml").write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "c.toml"), "--no-progress"], prog_name="pixelray")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: [run] device = 'cuda': this embedded Ray (no cluster, no autoscaler) has no GPU and cannot get one; "
        "set device = 'cpu' (or 'auto'), or join a cluster with GPUs (--address ADDRESS)"]
    assert not (tmp_path / "out").exists()
