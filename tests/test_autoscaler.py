"""The pool under Ray's own autoscaler (its fake multi-node provider: real autoscaler, real raylets):
GPU nodes added from zero for `auto` and a range, a range larger than the cluster can give, a GPU
node killed mid-sweep, and `ray job stop` leaving nothing asked for. See autoscaler_scenarios.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import background
import pytest
from background import in_background, session_assets

pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).with_name("autoscaler_scenarios.py")


@in_background()
def autoscaler_runs() -> dict:
    """The scenarios in one fresh interpreter, on one fake autoscaling cluster of their own."""
    data, models = session_assets()
    state = Path(tempfile.mkdtemp(prefix="pxa", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PYTHONPATH=f"{SCENARIOS.parent}{os.pathsep}{SCENARIOS.parents[1]}", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=str(state / "ray"))
    try:
        done = background.run([sys.executable, str(SCENARIOS), str(state), data, models[0]], env=env, timeout=900)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert done.returncode == 0 and len(lines) == 1, (done.stdout[-3000:], done.stderr[-5000:])
        return json.loads(lines[0][len("RESULT "):])
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def runs() -> dict:
    got = autoscaler_runs.result()
    assert got["left"] == [], f"processes of the fake cluster survived its stop: {got['left']}"
    return got


def _gpu_workers(stats: dict) -> dict:
    used = stats["workers"]["used"]
    assert all(w["reserves"] == {"CPU": 1, "GPU": 1} and w["device"] == "cpu" for w in used.values()), used
    return used


def test_auto_on_an_idle_cluster_waits_for_gpu_nodes_and_the_pool_grows_to_the_top_of_its_range(runs):
    """jobs/paper.toml's [run] (device = "auto", a range of GPUs) on a cluster whose GPU type starts at zero and
    whose autoscaler does not publish its node types (Ray's v1): it waits for GPU nodes, never computing on the
    head's CPU, and grows to three workers on the three nodes the autoscaler adds."""
    got = runs["grow"]
    assert got["gpus_before"] == 0  # no GPU when the sweep starts
    notes = [line for line in got["said"] if "waiting for the autoscaler to add GPU nodes" in line]
    assert len(notes) == 1 and notes[0].startswith(
        "[run] device = 'auto', gpus = '1..3': no GPU in the cluster yet"), got["said"]
    used = _gpu_workers(got["stats"])
    nodes = {w["node"] for w in used.values()}
    assert len(used) == 3 and len(nodes) == 3, used  # three workers on three GPU nodes
    assert got["head"] not in nodes and nodes <= set(got["gpu_nodes"])  # never on the head
    assert got["same"]  # the rows of the solo in-process run


def test_a_range_larger_than_the_cluster_can_give_goes_on_with_what_comes(runs):
    got = runs["range"]
    assert got["freed"], "the last run's workers still held their GPUs two minutes on"
    used = _gpu_workers(got["stats"])
    workers = got["stats"]["workers"]
    # the three GPU nodes there can be, each with a worker; those that could not come given up (under load,
    # a placed worker may be lost and replaced, and its replacement counted late in its turn)
    assert len({w["node"] for w in used.values()}) == 3 and workers["given_up"] >= 1, (workers, got["said"])
    warnings = [line for line in got["said"] if line.startswith("warning: ")]
    assert warnings and all("\n" not in w for w in warnings), got["said"]
    assert re.match(r"warning: \[run\] gpus = '1\.\.5': [12] worker\(s\) not placed within 20 s \(each asks for "
                    r"\{'CPU': 1, 'GPU': 1\}; .*\): going on with [1-3] placed", warnings[0]), warnings
    assert got["same"]


def test_a_gpu_node_killed_mid_sweep_changes_nothing(runs):
    got = runs["loss"]
    assert got["started"] and got["killed"] > 0 and got["error"] is None and not got["finished_before"], got
    workers = got["stats"]["workers"]
    assert workers["restarts"] >= 1 and got["victim"] in {w["node"] for w in workers["used"].values()}, workers
    assert got["same"]


def test_ray_job_stop_ends_the_driver_in_seconds_leaves_no_demand_and_the_rerun_resumes(runs):
    got = runs["job"]
    assert got["submitted"] and got["landed"] and not got["finished_before_stop"], got
    assert got["stop_rc"] == 0 and re.search("stopped", got["status"], re.I), (got["stop_out"], got["status"])
    assert got["seconds"] < 30, got["seconds"]
    assert got["demand"] == {"resource_demand": [], "pg_demand": [], "request_demand": []}, got["demand"]
    assert got["workers_left"] == []
    # the driver's one line in the job's logs, and no traceback (the stop lands inside Ray's ray.wait)
    assert "error: stopped by SIGTERM: the finished units are kept" in got["logs"], got["logs"]
    assert "Traceback" not in got["logs"], got["logs"]
    run = got["resumed_stats"]["units_run"]  # the units the stopped job had landed are not run again
    assert sum(run.values()) < 2 * got["resumed_stats"]["shards"], run
    assert got["same"]


def test_a_local_fine_tune_directory_that_a_node_does_not_see_is_refused_before_training(runs):
    got = runs["blind"]
    # one disk under the head and the GPU nodes: every node sees the directory, and the check leaves nothing
    assert got["checked"] == got["nodes"] >= 2 and not got["seen_left"], got
    if not got["joined"]:  # a machine where this process is root has them: there, not joining is a failure
        assert os.geteuid() != 0, f"a node in a private mount namespace did not join: {got['join_error']}"
        pytest.skip(f"no private mount namespace for a node here (unshare -m needs root): {got['join_error']}")
    error = got["error"] or ""
    assert error.startswith(f"[output] dir: {got['hidden']}/ft is local to some nodes: 1 of "), got
    assert "give a directory on a mount every node shares" in error and "\n" not in error
    assert got["left"] == []  # refused before training: nothing written


def test_train_augment_with_use_gpu_waits_for_an_autoscaler_that_does_not_publish_its_node_types(runs):
    """Ray's v1 autoscaler publishes no node types to the GCS: read as 'no autoscaler', a fine-tune needing more
    GPUs than present was refused on every launcher and KubeRay cluster whose GPU group starts at zero."""
    waits = runs["blind"]["gpu_wait"]
    assert len(waits) == 1 and "waiting for its autoscaler to add GPU nodes" in waits[0], waits
