"""Progress of a sweep: Prometheus metrics (prometheus-client) and a console progress bar (tqdm).

The driver owns one :class:`SweepTelemetry`. Its metrics live in a private
registry, served over HTTP only when a port is given (127.0.0.1 by default).
Workers report through ``ray.util.metrics`` instead (see ``pixelray.engine.worker``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from tqdm import tqdm

__all__ = ["SweepTelemetry"]


class SweepTelemetry:
    """Units total/done/failed, images evaluated per model, throughput, ETA, worker restarts.

    Throughput is the phase's images (x cells) over the seconds since the phase started; the
    ETA is the units left over the rate of units run in this phase (resumed units excluded).
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", progress: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # seconds, monotonic (tests pass a scripted one)
        self.registry = CollectorRegistry()
        r = self.registry
        self.units_total = Gauge("pixelray_units_total", "Units planned in this phase.", ["phase"], registry=r)
        self.units_done = Counter("pixelray_units_done", "Units finished (incl. resumed).", ["phase"], registry=r)
        self.units_failed = Counter("pixelray_units_failed", "Units re-queued after their worker died.", registry=r)
        self.images = Counter("pixelray_images_evaluated", "Images evaluated (x cells).", ["model"], registry=r)
        self.throughput = Gauge("pixelray_images_per_second", "Recent images/s (x cells).", registry=r)
        self.eta = Gauge("pixelray_eta_seconds", "Estimated seconds left in this phase.", registry=r)
        self.restarts = Counter("pixelray_worker_restarts", "Workers replaced after dying.", registry=r)
        self.server = None
        self.port = None
        if port is not None:
            self.server, _thread = start_http_server(port, addr=host, registry=r)
            self.port = self.server.server_address[1]
        self._progress = progress
        self._bar: tqdm | None = None
        self._start = 0.0
        self._images_phase = 0
        self._phase, self._done, self._total, self._resumed = "", 0, 0, 0

    def start_phase(self, phase: str, total: int, already_done: int) -> None:
        self.close_bar()
        self.units_total.labels(phase).set(total)
        self.units_done.labels(phase).inc(already_done)
        self._phase, self._total, self._done, self._resumed = phase, total, already_done, already_done
        self._start, self._images_phase = self.clock(), 0
        self._bar = tqdm(
            total=total, initial=already_done, desc=f"{phase:>6}", unit="unit",
            disable=not self._progress, file=sys.stderr, dynamic_ncols=True,
        )

    def unit_done(self, model: str, images: int) -> None:
        self._done += 1
        self._images_phase += images
        self.units_done.labels(self._phase).inc()
        self.images.labels(model).inc(images)
        elapsed = max(self.clock() - self._start, 1e-9)
        rate = self._images_phase / elapsed
        self.throughput.set(rate)
        left = self._total - self._done
        unit_rate = (self._done - self._resumed) / elapsed
        self.eta.set(left / unit_rate if unit_rate else 0)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:,.0f} img/s", refresh=False)
            self._bar.update(1)

    def unit_failed(self) -> None:
        self.units_failed.inc()

    def worker_replaced(self) -> None:
        self.restarts.inc()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self, linger: float = 0.0) -> None:
        """Stop the progress bar and the metrics server, keeping the server up ``linger`` seconds
        first, so that a scrape after the last unit sees the final counts."""
        self.close_bar()
        if self.server is not None:
            if linger > 0:
                time.sleep(linger)
            self.server.shutdown()
            self.server.server_close()
            self.server = None
