"""Prometheus metrics of the driver, scraped over loopback."""

from __future__ import annotations

import urllib.request

import pytest

from pixelray.telemetry import SweepTelemetry


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_are_served_on_loopback_and_track_progress():
    tel = SweepTelemetry(port=0, progress=False)
    try:
        assert tel.port and tel.server.server_address[0] == "127.0.0.1"
        tel.start_phase("cells", total=4, already_done=1)
        tel.unit_done("resnet101", images=250)
        tel.unit_failed()
        tel.worker_replaced()
        text = scrape(tel.port)
        assert 'pixelray_units_total{phase="cells"} 4.0' in text
        assert 'pixelray_units_done_total{phase="cells"} 2.0' in text
        assert 'pixelray_images_evaluated_total{model="resnet101"} 250.0' in text
        assert "pixelray_units_failed_total 1.0" in text
        assert "pixelray_worker_restarts_total 1.0" in text
        assert "pixelray_eta_seconds" in text and "pixelray_images_per_second" in text
    finally:
        tel.close()


def test_no_port_means_no_server():
    tel = SweepTelemetry(port=None, progress=False)
    assert tel.server is None and tel.port is None
    tel.close()


def _gauge(tel: SweepTelemetry, name: str) -> float:
    return tel.registry.get_sample_value(name)


def test_throughput_and_eta_on_a_scripted_sequence():
    # phase starts at t=100 with 10 units, 2 of them resumed; units finish at t=104, 106, 112
    times = iter([100.0, 104.0, 106.0, 112.0])
    tel = SweepTelemetry(progress=False, clock=lambda: next(times))
    tel.start_phase("cells", total=10, already_done=2)
    expected = [  # (images of the unit, images/s, ETA s): rate = images / elapsed; ETA = left / (run / elapsed)
        (400, 400 / 4, 7 / (1 / 4)),
        (200, 600 / 6, 6 / (2 / 6)),
        (600, 1200 / 12, 5 / (3 / 12)),
    ]
    for images, rate, eta in expected:
        tel.unit_done("m", images)
        assert _gauge(tel, "pixelray_images_per_second") == pytest.approx(rate, rel=1e-12)
        assert _gauge(tel, "pixelray_eta_seconds") == pytest.approx(eta, rel=1e-12)
    assert tel.registry.get_sample_value("pixelray_images_evaluated_total", {"model": "m"}) == 1200
    assert tel.registry.get_sample_value("pixelray_units_done_total", {"phase": "cells"}) == 5
    tel.close()
