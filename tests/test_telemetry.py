"""Prometheus metrics of the driver, scraped over loopback."""

from __future__ import annotations

import urllib.request

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
