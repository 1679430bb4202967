"""The worker pool and the scheduler: ModelWorker actors, units handed to idle ones, failures re-queued.

Retries are the driver's, not Ray's: actors start with ``max_restarts=0`` and
``max_task_retries=0``, so a worker that dies (killed, out of memory, its node lost)
surfaces here as an actor error. Its in-flight units go back to the queue, the worker
is replaced, and both are counted (``pixelray_units_failed_total``,
``pixelray_worker_restarts_total``). A unit that was running on a worker that died
``MAX_UNIT_FAILURES`` times stops the sweep with its name: it is probably what kills them.
An error raised by a unit itself (bad data, a model that does not fit) stops the sweep
at once with that error's message.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pixelray.config.run import gpu_range
from pixelray.config.sweep import SweepConfig
from pixelray.cpu_memory import worker_env
from pixelray.engine.units import Unit
from pixelray.engine.worker import ModelWorker
from pixelray.errors import SweepError, one_line
from pixelray.sweep.devices import choose_device, gpu_outlook
from pixelray.telemetry import SweepTelemetry

__all__ = ["DEVICE_OVERRIDE", "MAX_UNIT_FAILURES", "WorkerPool", "cause", "connect", "reserved_cpus", "schedule"]

_WORKER_SERIAL = itertools.count(1)

#: How many worker deaths one unit may see before the sweep stops.
MAX_UNIT_FAILURES = 3


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (``auto`` or an address) or start an embedded local one (None/``local``).

    An embedded Ray stays on loopback: Ray otherwise takes the machine's address for its node
    and listens on every interface (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps it on 127.0.0.1).
    """
    local = address in (None, "", "local")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is first imported
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        # quiet: a one-line error stays one line (Ray announces the local instance at INFO)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1")  # an embedded Ray: loopback only
    else:  # a cluster's driver: the workers' output (errors, warnings) reaches it, and so `ray job logs`
        ray.init(address=address, log_to_driver=True)


def reserved_cpus(device: str, threads: int) -> int:
    """CPUs a worker reserves from Ray: on a CPU, the cores its torch threads use (at most the largest
    node's CPUs, so that it can be placed at all); on a GPU, one for its Python thread and the copies."""
    if device == "cuda":
        return 1
    import ray

    largest = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=1)
    return max(1, min(threads, largest))


def cause(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (bad data, missing weights), else the error itself."""
    return exc.cause if getattr(exc, "cause", None) is not None else exc


#: Environment variable: compute on this device ("cpu") whatever the workers reserve (tests, dry runs
#: of a GPU cluster's scheduling on logical GPUs).
DEVICE_OVERRIDE = "PIXELRAY_DEVICE_OVERRIDE"


@dataclass
class _Worker:
    handle: Any
    name: str
    ping: Any  # its answer means the actor was placed and built
    spawned: float
    placed: bool = False
    node: str | None = None
    model: str | None = None  # the model it holds (or is about to load)
    inflight: dict[Any, Unit] = field(default_factory=dict)  # object ref -> unit


class WorkerPool:
    """ModelWorker actors, each with up to ``depth`` units in flight (the second one prefetches).

    GPU workers (``device`` cuda, or auto with GPUs or ``[run] gpus``) reserve one GPU each:
    ``gpus = N`` runs N, ``"M..N"`` up to N and ``"all"`` one per GPU free for it, growing as GPUs
    appear (up to what the autoscaler can add, where it publishes that). The autoscaler is asked
    only through the workers waiting to be placed (their demand; nothing outlives the driver). CPU
    workers reserve the cores they compute on (``num_cpus`` = their torch threads). A worker gets
    units only once placed (its ``ping`` answered); one still unplaced after ``placement_timeout``
    seconds is given up with a one-line warning while at least the fewest (M; N for ``gpus = N``; all
    CPU workers) are placed or still within their own timeout (a replacement's starts when it is
    spawned), else the sweep stops with the resources asked for and those the cluster has.
    """

    def __init__(self, config: SweepConfig, telemetry: SweepTelemetry, depth: int = 2,
                 say: Callable[[str], None] | None = None):
        import ray

        resources = ray.cluster_resources()
        outlook = gpu_outlook()
        device, note = choose_device(config.device, config.gpus, outlook, config.placement_timeout)
        self.say = say or (lambda msg: None)
        if note:
            self.say(note)
        self.device = device
        self.gpus = (config.gpus or "all") if device == "cuda" else None
        self.workers: list[_Worker] = []
        cpus = int(resources.get("CPU", 1))
        if device == "cuda":
            self.fewest, self.most = gpu_range(self.gpus)
            if self.most is None and outlook.can_come:
                self.most = outlook.most  # "all" on an autoscaling cluster: every GPU it can add
                if self.most is None:
                    self.say("[run] gpus = 'all': the autoscaler does not publish how many GPUs it can add: one "
                             "worker per GPU present, from one; set gpus = 'M..N' to have up to N GPU nodes added")
            n = self._gpu_target()
        else:
            n = self.fewest = self.most = config.workers or 1
        threads = config.threads or max(1, cpus // n)
        self.options = dict(
            num_gpus=1 if device == "cuda" else 0,
            num_cpus=reserved_cpus(device, threads),
            max_concurrency=depth,
            max_restarts=0,  # the driver replaces dead workers and re-queues their units
            max_task_retries=0,
        )
        compute = os.environ.get(DEVICE_OVERRIDE) or device
        env = worker_env(compute, config.huge_pages)  # huge pages for CPU workers only, set where Ray starts them
        if env:
            self.options["runtime_env"] = {"env_vars": env}
        self.args = dict(device=compute, threads=threads, batch_size=config.batch_size, amp=config.amp,
                         cells_per_pass=config.cells_per_pass, cuda_graphs=config.cuda_graphs)
        self.depth = depth
        self.timeout = config.placement_timeout
        self.telemetry = telemetry
        self.restarts = 0  # workers replaced after dying
        self.given_up = 0  # workers never placed within the timeout, given up while enough others work
        self._grow_after = 0.0  # monotonic time before which "all" does not spawn again (after a give-up)
        self.used: dict[str, dict] = {}  # every worker placed, by name: node, device (for stats.json)
        self._grow(n)

    def _gpu_target(self) -> int:
        """How many GPU workers to have: the most asked for, or for "all" one per GPU free for us now
        (the GPUs our placed workers hold and those nobody holds; never fewer than one)."""
        if self.most is not None:
            return self.most
        import ray

        free = int(ray.available_resources().get("GPU", 0))
        return max(1, len(self.placed) + free)

    def _grow(self, n: int) -> None:
        """Spawn workers up to ``n``: those that cannot be placed yet are the autoscaler's demand."""
        while len(self.workers) < n:
            self.workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        import ray

        # numbered across the pools of this process: a sweep right after another never names a worker after
        # one that Ray may still be ending
        name = f"pixelray-worker-{os.getpid()}-{next(_WORKER_SERIAL)}"
        handle = ray.remote(ModelWorker).options(name=name, **self.options).remote(**self.args)
        return _Worker(handle, name, handle.ping.remote(), time.monotonic())

    @property
    def reserves(self) -> dict[str, float]:
        """What each worker asks the cluster for."""
        return {k: v for k, v in (("CPU", self.options["num_cpus"]), ("GPU", self.options["num_gpus"])) if v}

    @property
    def placed(self) -> list[_Worker]:
        return [w for w in self.workers if w.placed]

    def poll(self) -> None:
        """Note the workers placed since the last poll, follow the cluster's GPUs, enforce the timeout."""
        import ray
        from ray.exceptions import RayActorError

        pending = [w for w in self.workers if not w.placed]
        if pending:
            ready, _ = ray.wait([w.ping for w in pending], num_returns=len(pending), timeout=0)
            done = set(ready)
            for w in pending:
                if w.ping not in done:
                    continue
                try:
                    w.node, w.placed = ray.get(w.ping)["node"], True
                    self.used[w.name] = {"node": w.node, "device": self.args["device"], "reserves": self.reserves}
                except RayActorError:  # it died being built (its node went away): build another
                    self.replace(w)
        if self.gpus is not None and self.most is None and time.monotonic() >= self._grow_after:
            self._grow(self._gpu_target())  # "all" without an autoscaler's word: follow the free GPUs
        late = [w for w in self.workers if not w.placed and time.monotonic() - w.spawned > self.timeout]
        if not late:
            return
        asked = self.reserves
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        what = f"[run] gpus = {self.gpus!r}" if self.device == "cuda" else f"{len(self.workers)} CPU worker(s)"
        if len(self.workers) - len(late) < self.fewest:  # the placed and the younger (a replacement has its own time)
            raise SweepError(
                f"{what}: {len(late)} of {len(self.workers)} workers could not be placed within {self.timeout:g} s "
                f"(each asks for {asked}; the cluster has {have}, {free} free); add nodes, ask for fewer workers "
                "or threads, or raise [run] placement_timeout"
            )
        for w in late:  # enough others work: go on without them
            self.workers.remove(w)
            ray.kill(w.handle, no_restart=True)
            self.given_up += 1
        self._grow_after = time.monotonic() + self.timeout
        if self.most is not None:
            self.most = len(self.workers)  # a range's upper end that the cluster cannot give: not asked again
        self.say(f"warning: {what}: {len(late)} worker(s) not placed within {self.timeout:g} s (each asks for "
                 f"{asked}; the cluster has {have}, {free} free): going on with {len(self.placed)} placed"
                 + (f" and {len(self.workers) - len(self.placed)} waiting" if len(self.workers) > len(self.placed)
                    else ""))

    def wait_placed(self) -> _Worker:
        """The first placed worker, waiting (and polling) for one."""
        while not self.placed:
            self.poll()
            time.sleep(0.1)
        return self.placed[0]

    def replace(self, worker: _Worker) -> None:
        import ray

        self.workers.remove(worker)
        ray.kill(worker.handle, no_restart=True)
        self.workers.append(self._spawn())
        self.restarts += 1
        self.telemetry.worker_replaced()

    def call(self, method: str, *args: Any) -> Any:
        """Call a method on one placed worker and wait: the unit's own error as SweepError, one line."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        worker = self.wait_placed()
        try:
            return ray.get(getattr(worker.handle, method).remote(*args))
        except RayTaskError as exc:
            raise SweepError(one_line(cause(exc))) from None
        except RayActorError as exc:
            raise SweepError(f"the worker died during {method} ({one_line(exc, 300)})") from None

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w.handle, no_restart=True)
        self.workers = []


def schedule(
    pool: WorkerPool,
    units: list[Unit],
    submit: Callable[[Any, Unit], Any],
    on_done: Callable[[Unit, dict], None],
    telemetry: SweepTelemetry,
    skip: Callable[[Unit], bool] | None = None,
) -> None:
    """Run ``units`` on the pool's workers until all are done.

    An idle worker takes a unit of the model it holds; when that model's work runs
    out it switches to the model with the most work left (fewest workers on it).
    A unit whose worker died is re-queued and the worker replaced; an error raised
    by the unit itself (bad data, missing weights) stops the sweep.

    ``skip(unit)`` (optional) drops units that are no longer needed before they are
    submitted. It must be monotone along each model's queue: once it holds for a
    unit it holds for every later unit of that model, which are dropped with it.
    """
    import ray

    state = _Schedule(pool, telemetry, skip)
    for unit in units:
        state.pending[unit.model].append(unit)
    while True:
        pool.poll()
        for worker in pool.placed:  # never a unit for a worker that is not placed
            state.fill(worker, submit)
        refs = {ref: w for w in pool.workers for ref in w.inflight}
        if not refs:
            if not any(state.pending.values()):
                return
            time.sleep(0.2)  # units left, no worker placed yet: poll() waits for one, or times out
            continue
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
        for ref in ready:
            state.collect(ref, refs[ref], on_done)


@dataclass
class _Schedule:
    """The scheduler's state: the units not yet submitted, by model, and the worker deaths each unit saw."""

    pool: WorkerPool
    telemetry: SweepTelemetry
    skip: Callable[[Unit], bool] | None = None
    pending: defaultdict[str, deque[Unit]] = field(default_factory=lambda: defaultdict(deque))
    failures: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def drop_unneeded(self) -> None:
        """Drop each model's queue once ``skip`` holds for its next unit (counted as done, with no work)."""
        for queue in self.pending.values():
            if queue and self.skip is not None and self.skip(queue[0]):
                for unit in queue:
                    self.telemetry.unit_done(unit.model, 0)
                queue.clear()

    def next_unit(self, worker: _Worker) -> Unit | None:
        """The next unit for ``worker``: of the model it holds, else of the model with the most work per worker."""
        self.drop_unneeded()
        model = worker.model
        if not self.pending.get(model):
            left = {m: q for m, q in self.pending.items() if q}
            if not left:
                return None
            holders: dict[str | None, int] = defaultdict(int)
            for w in self.pool.workers:
                holders[w.model] += 1
            model = max(left, key=lambda m: len(left[m]) / (1 + holders[m]))
            worker.model = model
        return self.pending[model].popleft()

    def fill(self, worker: _Worker, submit: Callable[[Any, Unit], Any]) -> None:
        """Submit units to ``worker`` until it has the pool's depth in flight, or none is left."""
        while len(worker.inflight) < self.pool.depth:
            unit = self.next_unit(worker)
            if unit is None:
                break
            worker.inflight[submit(worker.handle, unit)] = unit

    def collect(self, ref: Any, worker: _Worker, on_done: Callable[[Unit, dict], None]) -> None:
        """A finished ref: its result to ``on_done``; a unit's own error stops the sweep; a dead worker's
        units go back to the queue and the worker is replaced."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        if ref not in worker.inflight:  # its worker died and was handled earlier in this loop
            return
        unit = worker.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            raise SweepError(f"unit {unit.key} failed: {one_line(cause(exc))}") from None
        except (ActorUnavailableError, RayActorError) as exc:
            lost = [unit, *worker.inflight.values()]
            worker.inflight.clear()
            self.requeue(lost, exc)
            if worker in self.pool.workers:
                self.pool.replace(worker)
            return
        on_done(unit, result)

    def requeue(self, lost: list[Unit], exc: BaseException) -> None:
        """Put units whose worker died back at the front of their queues; one that saw
        ``MAX_UNIT_FAILURES`` deaths stops the sweep."""
        for other in lost:
            self.telemetry.unit_failed()
            self.failures[other.key] += 1
            if self.failures[other.key] >= MAX_UNIT_FAILURES:
                raise SweepError(
                    f"unit {other.key} was running when its worker died {self.failures[other.key]} times "
                    f"(last: {type(exc).__name__}); it may need more memory than a worker has"
                ) from None
            self.pending[other.model].appendleft(other)
