"""A local Ray head for ``ray job submit``: 127.0.0.1 only, token auth, Ray's metrics export.

    python cluster/local.py start [--dir DIR] [--port 6379] [--dashboard-port 8265] ...   # make cluster-local
    python cluster/local.py stop [--dir DIR]                                                # make cluster-stop

Everything of one head lives in one directory (default ``/tmp/pxr-<uid>``: short, because
Ray's socket paths under it must fit in 107 bytes):

    ray/         Ray's --temp-dir: sessions, logs, prom_metrics_service_discovery.json
    auth_token   the token (mode 0600): $RAY_AUTH_TOKEN when set, else generated once and kept
    env          `. DIR/env` sets RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH for `ray job submit`
    head.pid     the `ray start --block` process, leader of a session of its own
    head.log     its output

The head starts in the current directory (``make cluster-local``: the checkout), so a job submitted
without ``--working-dir`` runs there and its relative paths (``jobs/demo.toml``, ``demo-out/``) mean
what they mean on the command line.

``stop`` ends this head only: ``ray stop`` would end every Ray of this user on the machine
(another engineer's, a test session's). The head runs as ``ray start --block`` in a new
session, so every process it starts belongs to that session or descends from it; ``stop``
sends SIGTERM to them (``--block`` then shuts Ray down), SIGKILL to what is left after
``--timeout`` seconds, and fails if any process of this head survives.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None)

HOST = "127.0.0.1"
DEFAULT_DIR = f"/tmp/pxr-{os.getuid()}"
# Ray's default worker port range (`ray start --min-worker-port/--max-worker-port`): every other port of
# the head must lie outside it, or `ray start` fails with a traceback
MIN_WORKER_PORT, MAX_WORKER_PORT = 10002, 19999


def _paths(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ("ray", "auth_token", "env", "head.pid", "head.log")}


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (ended, not yet reaped by its parent, e.g. a slow init) has ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` is a zombie: state Z in /proc/PID/stat (Linux; elsewhere ps leaves them out, see
    :func:`_process_table`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 1:].split()  # after the command name, which may hold spaces and ')'
    return bool(fields) and fields[0] == "Z"


def _leader(p: dict[str, Path]) -> int | None:
    """The recorded `ray start --block` process, if it still runs and names this head's temp dir
    (a pid file left by a crash may name a pid since reused by something else)."""
    try:
        pid = int(p["head.pid"].read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    args = _process_table().get(pid, (0, 0, ""))[2]
    return pid if _names(p["ray"]).search(args) else None


def _names(temp_dir: Path) -> re.Pattern:
    return re.compile(rf"(^|[\s=]){re.escape(str(temp_dir))}(/|\s|$)")


def _check_port_range(ports: dict[str, int], low: int, high: int) -> None:
    """Refuse, in one line, ports that are no ports, the same port twice, or one in Ray's worker port range
    ``low..high`` (``ray start`` would fail with a traceback)."""
    if not 1 <= low <= high <= 65535:
        _fail(f"worker port range {low}..{high}: give 1 <= CLUSTER_MIN_WORKER_PORT <= CLUSTER_MAX_WORKER_PORT "
              "<= 65535 (--min-worker-port, --max-worker-port)")
    bad = [f"{name}={value}" for name, value in ports.items() if not 1 <= value <= 65535]
    if bad:
        _fail(f"not a port: {', '.join(bad)}; give ports in 1..65535")
    names = {value: [n for n, v in ports.items() if v == value] for value in ports.values()}
    same = next((n for n in names.values() if len(n) > 1), None)
    if same:
        _fail(f"{' and '.join(same)} are the same port ({ports[same[0]]}); give each its own")
    inside = [f"{name}={value}" for name, value in ports.items() if low <= value <= high]
    if inside:
        _fail(f"{', '.join(inside)} in Ray's worker port range {low}..{high}, which Ray keeps for its workers; "
              f"choose a port outside it (e.g. make cluster-local {inside[0].split('=')[0]}={_outside(low, high)}), "
              "or move the range (CLUSTER_MIN_WORKER_PORT, CLUSTER_MAX_WORKER_PORT)")


def _outside(low: int, high: int) -> int:
    """A port just outside ``low..high`` (below it where there is room)."""
    return low - 1 if low > 1024 else high + 1


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: 401/404 still mean it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2):  # loopback only
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _token(path: Path) -> None:
    """Write $RAY_AUTH_TOKEN to ``path``, or keep the token there, or generate one (mode 0600)."""
    given = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not given and path.exists() and path.read_text().strip():
        return
    token = given or secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)


@app.command()
def start(
    dir: Annotated[str, typer.Option("--dir", help="State directory (short: socket paths must fit).")] = DEFAULT_DIR,
    port: Annotated[int, typer.Option("--port", help="GCS port.")] = 6379,
    dashboard_port: Annotated[int, typer.Option("--dashboard-port", help="Dashboard and job API port.")] = 8265,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Ray's Prometheus metrics export port.")] = 8080,
    client_port: Annotated[int, typer.Option("--client-port", help="Ray client server port.")] = 10001,
    agent_port: Annotated[int, typer.Option("--agent-port", help="Dashboard agent (job agent) HTTP port.")] = 52365,
    min_worker_port: Annotated[
        int, typer.Option("--min-worker-port", help="Lowest port of Ray's worker port range.")
    ] = MIN_WORKER_PORT,
    max_worker_port: Annotated[
        int, typer.Option("--max-worker-port", help="Highest port of Ray's worker port range.")
    ] = MAX_WORKER_PORT,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="CPUs for Ray (default: all).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait until jobs can be submitted.")] = 180,
) -> None:
    """Start the head and wait until `ray job submit` works."""
    root = Path(dir).resolve()
    p = _paths(root)
    if len(str(p["ray"])) > 40:  # + /session_<date>_<time>_<pid>/sockets/plasma_store
        _fail(f"--dir {root}: too long for Ray's socket paths (at most 107 bytes); use a short one such as /tmp/pxr")
    pid = _leader(p)
    if pid is not None:
        _fail(f"a local Ray head already runs from {root} (pid {pid}); `make cluster-stop` first")
    ports = {"CLUSTER_PORT": port, "CLUSTER_DASHBOARD_PORT": dashboard_port, "CLUSTER_METRICS_PORT": metrics_port,
             "CLUSTER_CLIENT_PORT": client_port, "CLUSTER_AGENT_PORT": agent_port}
    _check_port_range(ports, min_worker_port, max_worker_port)
    busy = [f"{name}={value}" for name, value in ports.items() if not _port_free(value)]
    if busy:
        _fail(f"port in use on {HOST} (another Ray?): {', '.join(busy)}; choose free ones, e.g. "
              f"make cluster-local {' '.join(b.split('=')[0] + '=...' for b in busy)}")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    p["ray"].mkdir(exist_ok=True)
    _token(p["auth_token"])

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(p["auth_token"]), "RAY_USAGE_STATS_ENABLED": "0",
           # a one-node cluster: Ray then uses 127.0.0.1 as the node's address (as on macOS), instead of
           # replacing --node-ip-address=127.0.0.1 by the machine's address
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(var, None)
    ray = bin_dir / "ray"
    cmd = [str(ray if ray.exists() else "ray"), "start", "--head", "--block", "--disable-usage-stats",
           f"--node-ip-address={HOST}", f"--port={port}", f"--dashboard-host={HOST}",
           f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--min-worker-port={min_worker_port}", f"--max-worker-port={max_worker_port}",
           f"--temp-dir={p['ray']}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    with open(p["head.log"], "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # jobs without --working-dir run here
    p["head.pid"].write_text(f"{head.pid}\n")

    # the dashboard answers before its job agent does ("No available agent"); wait for both, and the metrics
    urls = [f"http://{HOST}:{dashboard_port}/api/version", f"http://{HOST}:{agent_port}/",
            f"http://{HOST}:{metrics_port}/metrics"]
    deadline = time.monotonic() + timeout
    while not all(_answers(u) for u in urls):
        if head.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {head.returncode}" if head.poll() is not None else f"not ready after {timeout:.0f} s"
            tail = p["head.log"].read_text()[-3000:]
            _stop(root, quiet=True)
            _fail(f"the Ray head {why}; its log ({p['head.log']}) ends:\n{tail}")
        time.sleep(0.5)

    address = f"http://{HOST}:{dashboard_port}"
    p["env"].write_text(f"export RAY_ADDRESS={address}\nexport RAY_AUTH_MODE=token\n"
                        f"export RAY_AUTH_TOKEN_PATH={p['auth_token']}\n")
    typer.echo(
        f"Ray head on {HOST} (pid {head.pid}), token auth on, state in {root}\n"
        f"  dashboard/jobs: {address}   metrics: http://{HOST}:{metrics_port}/metrics\n"
        f"  Prometheus service discovery: {p['ray']}/prom_metrics_service_discovery.json\n"
        f"submit:\n"
        f"  . {p['env']}\n"
        f"  ray job submit -- python jobs/sweep.py --smoke-test      # runs in {Path.cwd()}\n"
        f"stop: make cluster-stop" + ("" if str(root) == DEFAULT_DIR else f" CLUSTER_DIR={root}")
    )


@app.command()
def stop(
    dir: Annotated[str, typer.Option("--dir", help="State directory given to start.")] = DEFAULT_DIR,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before SIGKILL.")] = 30,
) -> None:
    """Stop this head's processes, and only them; fail if one survives."""
    root = Path(dir).resolve()
    left = _stop(root, timeout=timeout)
    if left:
        _fail("still running after SIGKILL: " + "; ".join(f"{pid} {args[:120]}" for pid, args in left))


def _stop(root: Path, timeout: float = 30, quiet: bool = False) -> list[tuple[int, str]]:
    p = _paths(root)
    leader = _leader(p)
    targets = _own_processes(leader, p["ray"])
    if not targets:
        if not quiet:
            typer.echo(f"no Ray head of {root} is running")
        p["head.pid"].unlink(missing_ok=True)
        return []
    # SIGTERM to the leader first: `ray start --block` then stops Ray's processes in order
    if leader is not None and leader in targets:
        _signal([leader], signal.SIGTERM)
    deadline = time.monotonic() + timeout / 2
    while time.monotonic() < deadline and leader is not None and _alive(leader):
        time.sleep(0.2)
    targets |= _own_processes(leader, p["ray"])
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + timeout / 2
    while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
        time.sleep(0.2)
    _signal([pid for pid in targets if _alive(pid)], signal.SIGKILL)
    time.sleep(0.5)
    left = sorted(_own_processes(leader, p["ray"]) | {pid for pid in targets if _alive(pid)})
    if not left:
        p["head.pid"].unlink(missing_ok=True)
        p["env"].unlink(missing_ok=True)
        if not quiet:
            typer.echo(f"stopped the Ray head of {root} ({len(targets)} processes)")
    table = _process_table()
    return [(pid, table.get(pid, (0, 0, ""))[2]) for pid in left if _alive(pid)]


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, process group, command line), from ps (Linux and macOS): the running processes, not
    the zombies (state Z: ended, waiting for their parent to reap them)."""
    out = subprocess.run(["ps", "-A", "-ww", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat=",
                          "-o", "args="], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4 and not parts[3].startswith("Z"):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[4] if len(parts) > 4 else "")
    return table


def _own_processes(leader: int | None, temp_dir: Path) -> set[int]:
    """This head's processes: the leader's process group and descendants, and any naming its temp dir."""
    table = _process_table()
    names_dir = _names(temp_dir)
    own = {pid for pid, (_, _, args) in table.items() if names_dir.search(args)}
    if leader is not None:
        own |= {pid for pid, (_, pgid, _) in table.items() if pgid == leader}
        if leader in table:
            own.add(leader)
    grew = True
    while grew:  # descendants (a Ray worker or a job's driver may start a process group of its own)
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in own} - own
        own |= more
        grew = bool(more)
    own.discard(os.getpid())
    return own


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
