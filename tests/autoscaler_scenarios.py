"""Sweeps under Ray's own autoscaler: a head started with an autoscaling config whose GPU node type
starts at zero, on this machine (Ray's fake multi-node provider: the real v1 autoscaler and real
raylets, each added node a `ray` node process of its own with ``GPU`` in its resources).

Run by ``tests/test_autoscaler.py`` in a fresh interpreter, as ``python tests/autoscaler_scenarios.py
STATE DATA MODEL``; prints one ``RESULT {...}`` JSON line. STATE is a short directory of its own:
Ray's temp dir, the token, the config; every process that names it is this cluster's, and only
those are stopped at the end (never ``ray stop``, which would end every Ray on the machine).
The workers compute on CPU (``PIXELRAY_DEVICE_OVERRIDE=cpu``) while reserving a GPU each.

One cluster, in order: a solo in-process reference; ``device = "auto"`` with ``gpus = "1..3"`` on
the idle cluster (it waits, the autoscaler adds GPU nodes, the pool grows); ``gpus = "1..5"`` where
only three can come (a warning, the run goes on); a GPU node killed mid-sweep; a sweep submitted
as a Ray job and stopped with ``ray job stop``, then resumed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PIXELRAY_DEVICE_OVERRIDE"] = "cpu"
# every process on loopback: without it the driver, like the fake nodes, takes the machine's address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"



def own_token(state: Path) -> None:
    """One token for the cluster and this process's Ray clients (Ray reads the mode when imported)."""
    token = state / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


if __name__ == "__main__":
    own_token(Path(sys.argv[1]))

import ray  # noqa: E402
import yaml  # noqa: E402
from cluster_scenarios import LONG_GRID, cells, config, in_thread  # noqa: E402
from helpers import free_ports, wait_for  # noqa: E402

from pixelray.sweep import run_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GPU_NODES = 3  # the GPU node type's max_workers
#: LONG_GRID's cells and as many more: a run long enough for the autoscaler to add two nodes while it goes
GROW_GRID = {"counts": LONG_GRID["counts"], "amplitudes": [*LONG_GRID["amplitudes"], 10, 40, 90, 160]}
#: and more: a run on three workers that outlasts a placement timeout of 20 s (about 40 s here; the timeout is
#: that long because a worker's start, torch imported, takes over 12 s on a busy machine)
RANGE_GRID = {"counts": LONG_GRID["counts"],
              "amplitudes": [*GROW_GRID["amplitudes"], 30, 50, 80, 200, 25, 70, 140, 220, 15, 35, 45, 55, 65, 100,
                             180, 240, 5, 12, 28, 48, 75, 110, 150, 250]}
PORTS = ("port", "dashboard", "metrics", "client", "agent")
#: a dead node is noticed in about 5 s (Ray's defaults: about 30 s), not sooner: four raylets share two cores
FAST_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "5"}


def autoscaling_config(gcs: str) -> dict:
    """A head without GPUs and a 1-GPU node type from zero to three, for the fake provider."""
    return {
        "cluster_name": "pxr-fake",
        "max_workers": GPU_NODES,
        "idle_timeout_minutes": 10,  # the GPU nodes stay for the scenarios after the first
        "upscaling_speed": 10,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "disable_launch_config_check": True,
                     # the provider starts each node's Ray itself: no updater (it would fail setting tags)
                     "disable_node_updaters": True, "use_node_id_as_ip": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": GPU_NODES},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def start_head(state: Path) -> dict:
    """``ray start --head --block`` with the autoscaling config, token auth, everything on loopback."""
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    gcs = f"127.0.0.1:{ports['port']}"
    (state / "autoscaling.yaml").write_text(yaml.safe_dump(autoscaling_config(gcs)))
    token = state / "auth_token"  # own_token's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(FAST_DEATH, RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_TMPDIR=str(state / "ray"), HOME=str(state),
               PYTHONPATH=str(REPO))
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
           f"--port={ports['port']}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
           f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
           f"--autoscaling-config={state / 'autoscaling.yaml'}", f"--temp-dir={state / 'ray'}"]
    log = (state / "head.log").open("w")
    head = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    jobs = f"http://127.0.0.1:{ports['dashboard']}"
    up = wait_for(lambda: _ok([str(ray_bin), "job", "list", "--address", jobs], env), timeout=180)
    assert up and head.poll() is None, (state / "head.log").read_text()[-3000:]
    return {"gcs": gcs, "jobs": jobs, "env": env, "ray": str(ray_bin), "head": head}


def _ok(cmd: list[str], env: dict) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0


def own_processes(state: Path) -> set[int]:
    """Every process whose command line or environment names the state directory."""
    needle, me = str(state).encode() + b"/", os.getpid()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle in (proc / part).read_bytes():
                    found.add(int(proc.name))
                    break
            except OSError:
                pass
    return found


def stop(state: Path, head: subprocess.Popen | None) -> list[int]:
    """SIGTERM to the head's `ray start --block` (it stops its Ray), SIGKILL to what is left; the pids left."""
    if head is not None and head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
    for pid in own_processes(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not own_processes(state), timeout=30)
    return sorted(own_processes(state))


def autoscaler_report() -> dict:
    from ray.experimental.internal_kv import _internal_kv_get

    return json.loads(_internal_kv_get("__autoscaling_status") or b"{}")


def demand(report: dict) -> dict:
    """What the cluster is asked for and cannot place yet: tasks and actors, placement groups, and
    ``request_resources`` (the last is what outlives a driver)."""
    load = report.get("load_metrics_report") or {}
    return {key: load.get(key) or [] for key in ("resource_demand", "pg_demand", "request_demand")}


def kill_node(node_id: str) -> int:
    """SIGKILL every process of a fake node (they carry its id in their environment): the node is gone."""
    needle, killed = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode(), 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            pass
    return killed


def same_cells(out: Path, reference: list[dict]) -> bool:
    """The run's rows of the reference's cells are the reference's (but the config hash: the grids differ)."""
    ids = {row["cell_id"] for row in reference}
    drop = lambda rows: [{k: v for k, v in r.items() if k != "config_hash"} for r in rows]  # noqa: E731
    return drop([r for r in cells(out) if r["cell_id"] in ids]) == drop(reference)


def gpu_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


def head_node_id() -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


def first_unit(out: str, thread, timeout: float = 300) -> bool:
    units = Path(out) / "units" / "cells"
    return wait_for(lambda: bool(list(units.rglob("*.parquet"))) or not thread.is_alive(), timeout)


def scenarios(state: Path, data: str, model: str) -> dict:
    got: dict = {}
    out = state / "out"
    long = dict(grid=LONG_GRID, size=600)

    # the reference: a solo run on an embedded Ray of this process, before the cluster exists
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    reference = cells(run_sweep(config(data, [model], str(out / "reference"), device="cpu", threads=2, **long),
                                progress=False).out_dir)
    ray.shutdown()

    cluster = start_head(state)
    try:
        ray.init(address=cluster["gcs"], log_to_driver=False, _node_ip_address="127.0.0.1")
        head = head_node_id()
        gpus_before = ray.cluster_resources().get("GPU", 0)

        # auto on the idle cluster (its GPU type at zero), with a range, as jobs/paper.toml asks: it waits, the
        # autoscaler adds GPU nodes, the pool grows to three workers on three of them
        said: list[str] = []
        grown = run_sweep(config(data, [model], str(out / "grow"), device="auto", gpus="1..3", grid=GROW_GRID,
                                 size=600), progress=False, log=said.append)
        # long enough for the nodes to come; its rows of the reference's cells are the reference's
        got["grow"] = {"gpus_before": gpus_before, "said": said, "stats": grown.stats, "head": head,
                       "gpu_nodes": gpu_nodes(), "same": same_cells(grown.out_dir, reference)}

        # five asked for, three can come: two given up with a warning, the run goes on with three
        # (once the last run's workers have let their GPUs go: all three start at once; the run outlasts the
        # timeout, so that the two that cannot come are given up while it goes on)
        said = []
        freed = wait_for(lambda: ray.available_resources().get("GPU", 0) >= GPU_NODES, timeout=120)
        ranged = run_sweep(config(data, [model], str(out / "range"), device="auto", gpus="1..5",
                                  placement_timeout=20, grid=RANGE_GRID, size=600), progress=False, log=said.append)
        got["range"] = {"said": said, "stats": ranged.stats, "same": same_cells(ranged.out_dir, reference),
                        "freed": freed}

        # a GPU node killed mid-sweep: its units run elsewhere, the same rows
        before = set(ray.util.list_named_actors())
        thread, box = in_thread(config(data, [model], str(out / "loss"), device="auto", gpus=3, **long))
        started = first_unit(str(out / "loss"), thread)
        ours = [ray.get_actor(n) for n in set(ray.util.list_named_actors()) - before]
        ready, _ = ray.wait([a.ping.remote() for a in ours], num_returns=len(ours), timeout=30)
        victim = sorted(ray.get(ready)[i]["node"] for i in range(len(ready)))[0]  # a node with a working worker
        killed = kill_node(victim)
        thread.join(600)
        result = box.get("result")
        got["loss"] = {"started": started, "victim": victim, "killed": killed, "error": box.get("error"),
                       "finished_before": not thread.is_alive() and result is None,
                       "stats": result.stats if result else None,
                       "same": result is not None and cells(result.out_dir) == reference}
        got["job"] = job_stop(cluster, data, model, out, reference)
        got["blind"] = blind_node(cluster, state, data, model)
    finally:
        ray.shutdown()
        got["left"] = stop(state, cluster["head"])
    return got


def job_stop(cluster: dict, data: str, model: str, out: Path, reference: list) -> dict:
    """A sweep submitted as a Ray job, stopped with ``ray job stop`` once a unit has landed; then resumed."""
    import tomli_w

    job_out = out / "job"
    raw = {"data": {"path": data}, "models": {"names": [model], "weights": "none"},
           "eval": {"filter": "all", "size": 600, "batch_size": 100}, "grid": LONG_GRID,
           "output": {"dir": str(job_out)}, "run": {"threads": 1, "device": "auto", "gpus": "1..3"}}
    (out / "job.toml").write_text(tomli_w.dumps(raw))
    env = {**cluster["env"], "RAY_ADDRESS": cluster["jobs"]}
    ray_bin = cluster["ray"]
    submit = subprocess.run([ray_bin, "job", "submit", "--no-wait", "--", sys.executable, "jobs/sweep.py",
                             "--config", str(out / "job.toml"), "--no-progress"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    job_id = next(iter(re.findall(r"raysubmit_[A-Za-z0-9]+", submit.stdout)), None)
    landed = wait_for(lambda: bool(list((job_out / "units").rglob("*.parquet"))), timeout=300)
    start = time.monotonic()
    stopped = subprocess.run([ray_bin, "job", "stop", job_id], env=env, capture_output=True, text=True, timeout=120)
    status = ""

    def ended() -> bool:
        nonlocal status
        status = subprocess.run([ray_bin, "job", "status", job_id], env=env, capture_output=True, text=True,
                                timeout=60).stdout
        return re.search(r"stopped|failed|succeeded", status, re.IGNORECASE) is not None

    wait_for(ended, timeout=60)
    seconds = time.monotonic() - start
    logs = subprocess.run([ray_bin, "job", "logs", job_id], env=env, capture_output=True, text=True, timeout=60).stdout
    finished = (job_out / "cells.parquet").exists()
    # the autoscaler's next reports (every 5 s): nothing of the job left asked for
    after = time.time()
    wait_for(lambda: autoscaler_report().get("time", 0) > after + 6, timeout=60)
    left = demand(autoscaler_report())
    workers = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
               if n["name"].startswith("pixelray-worker-") and n["namespace"] != ray.get_runtime_context().namespace]
    resumed = run_sweep(config(data, [model], str(job_out), device="auto", gpus="1..3", grid=LONG_GRID, size=600),
                        progress=False)
    return {"submitted": submit.returncode == 0 and job_id is not None, "submit_out": submit.stdout[-2000:],
            "landed": landed, "stop_rc": stopped.returncode, "stop_out": (stopped.stdout + stopped.stderr)[-2000:],
            "status": status[-500:], "seconds": seconds, "finished_before_stop": finished, "demand": left,
            "workers_left": workers, "logs": logs[-3000:], "resumed_stats": resumed.stats,
            "same": cells(resumed.out_dir) == reference}


def blind_node(cluster: dict, state: Path, data: str, model: str) -> dict:
    """train-augment with a local --out: seen by every node here (one disk), then refused once a node joins
    whose view of the directory is a tmpfs of its own (a private mount namespace: ``unshare -m``)."""
    from pixelray.config.train import parse_train_config
    from pixelray.errors import TrainError
    from pixelray.train.driver import run_train_augment
    from pixelray.train.gpus import check_cluster_gpus
    from pixelray.train.shared import check_output_seen

    # more GPUs than the cluster has: its autoscaler (which does not publish its node types) may add them
    waits: list[str] = []
    check_cluster_gpus(GPU_NODES + 2, waits.append)
    hidden = state / "hidden"
    got: dict = {"gpu_wait": waits, "checked": check_output_seen(str(state / "seen")), "hidden": str(hidden),
                 "nodes": len([n for n in ray.nodes() if n["Alive"]]), "seen_left": (state / "seen").exists()}
    hidden.mkdir()
    # a node started as the fake provider starts its nodes (`ray start` refuses to join with the loopback-only
    # setting), after mounting a tmpfs of its own over the directory
    start = (f"import ray._private.node as n, ray._private.parameter as p, time; n.Node(p.RayParams("
             f"gcs_address='{cluster['gcs']}', redis_address='{cluster['gcs']}', node_ip_address='127.0.0.1', "
             "num_cpus=1, min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=0), head=False, "
             "shutdown_at_exit=True, spawn_reaper=False); time.sleep(3600)")
    join = f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -c \"{start}\""
    alive = len([n for n in ray.nodes() if n["Alive"]])
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", join], env=cluster["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    got["joined"] = wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) > alive or node.poll() is not None,
                             timeout=120) and node.poll() is None
    if not got["joined"]:  # no mount namespaces here (not root): the test says so
        got["join_error"] = node.stderr.read().decode()[-1000:] if node.poll() is not None else "timeout"
        return got
    raw = {"model": {"name": model}, "data": {"path": data}, "augment": {"aug": "pixels", "count": 16},
           "train": {"epochs": 1}, "run": {"workers": 1, "threads": 1}, "output": {"dir": str(hidden / "ft")}}
    try:
        run_train_augment(parse_train_config(raw), progress=False)
        got["error"] = None
    except TrainError as exc:
        got["error"] = str(exc)
    got["left"] = sorted(p.name for p in hidden.iterdir())
    node.send_signal(signal.SIGTERM)
    return got


if __name__ == "__main__":
    state, data, model = sys.argv[1:]
    print("RESULT " + json.dumps(scenarios(Path(state), data, model), default=str), flush=True)
