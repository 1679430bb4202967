"""`make cluster-local` / `make cluster-stop` on this machine: a token-auth Ray head on 127.0.0.1, a sweep
submitted with `ray job submit --working-dir` (refused without the token and with a wrong one), the metrics
a Grafana dashboard reads, and no process left behind.

One head start and two submits: the make targets run as a user runs them, with free ports of their own
(the session's local Ray, or another engineer's, may hold Ray's defaults) and a state directory of
their own. Which processes are the head's is decided here, not by cluster/local.py: every process whose
command line or environment names that directory.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import background
import pandas as pd
import pytest
import tomli_w
import tomllib
from background import in_background, session_assets
from helpers import exported_names, free_ports, grafana_queries, promql_metric_names, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PORTS = ("PORT", "DASHBOARD_PORT", "METRICS_PORT", "CLIENT_PORT", "AGENT_PORT")


def test_cluster_local_token_job_metrics_and_stop():
    cluster_local.result()  # the scenario's asserts, raised here


@in_background()
def cluster_local() -> None:
    """The whole check, run in the background while other tests run (it mostly waits on Ray and make)."""
    synthetic_dataset, tiny_checkpoints = session_assets()
    tmp_path = Path(tempfile.mkdtemp(prefix="pxr-cl-"))
    try:
        _cluster_local(synthetic_dataset, tiny_checkpoints, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _cluster_local(synthetic_dataset, tiny_checkpoints, tmp_path):
    state = Path(tempfile.mkdtemp(prefix="pxr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    *cluster_ports, driver_port = free_ports(len(PORTS) + 1)
    ports = dict(zip(PORTS, cluster_ports, strict=True))
    home = tmp_path / "home"  # no ~/.ray/auth_token of the user's: only the cluster's token counts
    home.mkdir()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    make_vars = [f"CLUSTER_DIR={state}", "CLUSTER_CPUS=2", *(f"CLUSTER_{k}={v}" for k, v in ports.items())]
    dashboard = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
    seen: set[int] = set()
    try:
        up = _run(["make", "-s", "cluster-local", *make_vars], env, timeout=300)
        if up.returncode and "node timed out during startup" in up.stdout + up.stderr:
            # Ray's own 30 s for a raylet to register, which a 2-core machine under the whole suite's load can miss
            # (it did once, the GCS answering nothing in time): stopped as a user would, then started again
            _run(["make", "-s", "cluster-stop", f"CLUSTER_DIR={state}"], env, timeout=180)
            up = _run(["make", "-s", "cluster-local", *make_vars], env, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        seen |= _own_processes(state)
        assert seen, "no process names the state directory: the check below would prove nothing"

        # the job API: closed without the token, open with it
        token = (state / "auth_token").read_text().strip()
        assert len(token) >= 32 and (state / "auth_token").stat().st_mode & 0o077 == 0
        assert _status(f"{dashboard}/api/jobs/") == 401
        assert _status(f"{dashboard}/api/jobs/", token) == 200
        job_env = {**env, **_exports(state / "env")}
        assert job_env["RAY_ADDRESS"] == dashboard and job_env["RAY_AUTH_MODE"] == "token"

        out = tmp_path / "out"
        config = _demo_config(synthetic_dataset, tiny_checkpoints, out, tmp_path / "job.toml")
        # the checkout uploaded as the job's working directory (as on a remote cluster), its jobs/sweep.py run
        submit = ["ray", "job", "submit", "--working-dir", str(REPO), "--", "python", "jobs/sweep.py",
                  "--config", str(config), "--metrics-port", str(driver_port)]
        no_token, wrong_token = {"RAY_ADDRESS": dashboard}, {**job_env, "RAY_AUTH_TOKEN": "0" * 64}
        for bad, says in ((no_token, "Unauthorized"), (wrong_token, "Invalid authentication token")):
            refused = _run(submit, {**env, **bad}, timeout=120)
            assert refused.returncode != 0
            assert says in refused.stdout + refused.stderr, (refused.stdout + refused.stderr)[-2000:]
        assert not out.exists()

        with _Scraper(f"http://127.0.0.1:{driver_port}/metrics") as driver:
            done = _run(submit, job_env, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert "succeeded" in done.stdout
        seen |= _own_processes(state)
        cells = pd.read_parquet(out / "cells.parquet")
        assert len(cells) == 2 * 2 and (cells.n_images == 100).all()  # 2 models x counts [16, 256]

        # the driver's endpoint (lingering after the last table): parses, and every planned unit is done
        assert driver.text, "the driver's metrics were never scraped"
        driver_names = exported_names(driver.text)
        units = _samples(driver.text)
        phases = {labels["phase"] for name, labels, _ in units if name == "pixelray_units_total"}
        assert {"clean", "cells"} <= phases
        for phase in phases:
            total = _value(units, "pixelray_units_total", phase=phase)
            assert total > 0 and _value(units, "pixelray_units_done_total", phase=phase) == total
        # Ray's metrics export on the head: the workers' counters (pushed every few seconds)
        node_text = ""

        def workers_exported():
            nonlocal node_text
            node_text = _get(f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics")
            return "ray_pixelray_worker_units_total" in node_text

        assert wait_for(workers_exported, timeout=60), "the workers' counters never reached Ray's metrics export"
        exported = driver_names | exported_names(node_text)
        for title, expr in grafana_queries(REPO / "cluster" / "grafana-dashboard.json"):
            # the fine-tune's panels: checked against a real fine-tune in test_train_augment.py
            missing = {n for n in promql_metric_names(expr) if not n.startswith("ray_pixelray_train_")} - exported
            assert not missing, f"Grafana panel {title!r} queries {missing}, which this run did not export"

        # everything of this head listens on the loopback interface only
        listening = _listening(_own_processes(state))
        assert any(port == ports["DASHBOARD_PORT"] for _, port, _ in listening), listening  # the check sees them
        public = [entry for entry in listening if not ipaddress.ip_address(entry[0]).is_loopback]
        assert not public, public
    finally:
        down = _run(["make", "-s", "cluster-stop", f"CLUSTER_DIR={state}"], env, timeout=180)
        left = _own_processes(state) | {pid for pid in seen if _alive(pid) and _names(pid, state)}
        for pid in left:  # never leave them to the next test, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, f"make cluster-stop left processes of its head: {sorted(left)}"
    assert _run(["make", "-s", "cluster-stop", f"CLUSTER_DIR={state}"], env, timeout=60).returncode == 0


def _demo_config(data: str, checkpoints: list[str], out: Path, path: Path) -> Path:
    """jobs/demo.toml on the test data, cut to one experiment of two counts for CI (`--smoke-test` takes minutes)."""
    raw = tomllib.loads((REPO / "jobs" / "demo.toml").read_text())
    raw["data"]["path"] = data
    raw["models"]["names"] = list(checkpoints)
    raw["eval"].update(size=100, batch_size=100)
    raw["experiment"] = [{**raw["experiment"][0], "counts": [16, 256]}]
    raw.pop("attack", None)
    raw["output"]["dir"] = str(out)
    path.write_text(tomli_w.dumps(raw))
    return path


def _run(cmd, env, timeout):
    return background.run(cmd, env=env, cwd=REPO, timeout=timeout)  # killed if the session ends first


def _exports(path: Path) -> dict[str, str]:
    """The variables of an `export K=V` file."""
    pairs = [line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if "=" in line]
    return {k.strip(): v.strip() for k, v in pairs}


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # loopback only
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            return response.read().decode()
    except OSError:
        return ""


class _Scraper:
    """Scrapes a metrics endpoint every 0.2 s in the background; ``text`` is the last answer."""

    def __init__(self, url: str):
        self.url, self.text = url, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            text = _get(self.url)
            if text:
                self.text = text
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _samples(text: str) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples, name: str, **labels) -> float:
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(values) == 1, (name, labels, values)
    return values[0]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _names(pid: int, state: Path) -> bool:
    """Whether a process's command line or environment names the state directory."""
    needle = str(state).encode() + b"/"
    for part in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            pass
    return False


def _own_processes(state: Path) -> set[int]:
    me = os.getpid()
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != me
            and _names(int(p.name), state)}


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the TCP sockets these processes listen on (Linux /proc)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, st, inode = fields[1], fields[3], fields[9]
            if st == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                found.append((_address(address), int(port, 16), inodes[inode]))
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words host-endian
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET6, words)
