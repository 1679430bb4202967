"""report.html in a real browser: headless Chromium takes a screenshot and dumps the DOM it built.

Checks that every table has the rows and columns the hand-made runs call for, that every image
decodes, and that the page makes no request: neither a reference in the DOM nor one in Chromium's
network log (a control page with an external image proves the log would show one). Needs Debian's
``chromium`` (``.ci/run`` installs it); elsewhere the test skips, unless PIXELRAY_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from report_fixtures import external_refs, write_base_run, write_tuned_run

from pixelray.report import write_report

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves: even a request that slipped out goes nowhere
]
_HOW = "install it with `apt-get install -y chromium` (Debian/Ubuntu) to run this test; .ci/run does"

R101, R101_T, AUG_B, AUG_T = "resnet101 (base)", "resnet101 (tuned)", "r101-aug4 (base)", "r101-aug4 (tuned)"
#: per table: (label columns + value columns, rows), counted by hand from report_fixtures
EXPECTED = {
    "table-5": (2 + 4, 3 + 3 + 1 + 1 + 1 + 1),  # resnet101, densenet121: ours/paper/diff; 4 others: ours
    "table-6": (2 + 5, 3 + 3 + 1 + 1 + 1 + 1),
    "table-7": (3 + 5, 1 + 1),  # resnet101 ±40, the paper's ±40
    "table-8": (3 + 5, 7 + 2),  # 7 rows of ours (resnet101 at two areas), the paper's 224 and 100
    "table-9": (4 + 5, 2 + 2),  # still misclassified / restored, ours and the paper's
    "fgsm-success": (3 + 1, 1),
    "table-10": (3 + 5, 1 + 3),
    "table-11": (3 + 2, 3 + 3),
    "transfer": (3 + 3, 2),
}


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("PIXELRAY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"headless Chromium not found; {_HOW}")
        pytest.skip(f"headless Chromium not found; {_HOW}")
    return found


def open_in_chromium(chromium: str, page: Path, tmp: Path, *extra: str) -> tuple[str, list[dict]]:
    """Load ``page`` in a fresh profile; returns the DOM Chromium built and the URL requests it logged."""
    profile, netlog = tmp / "profile", tmp / "net.json"
    profile.mkdir()
    result = subprocess.run(
        [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--log-net-log={netlog}", *extra, "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = [e["params"] for e in log["events"]
                if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})]
    return result.stdout, requests


def page_requests(requests: list[dict]) -> list[str]:
    """URLs the page asked for (Chromium's own background requests have no origin) that leave the file."""
    return [r["url"] for r in requests
            if r.get("initiator") != "not an origin" and not r["url"].startswith(("file:", "data:"))]


class _Tables(HTMLParser):
    """Tables of the DOM by id: header cells and, per body row, its cells' texts; and every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.images: list[str] = []
        self._table = self._part = None
        self._row: list[str] | None = None
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), {"head": [], "rows": []})
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("th", "td") and self._row is not None:
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._text is not None:
            self._row.append("".join(self._text).strip())
            self._text = None
        elif tag == "tr" and self._row is not None:
            if self._part == "thead":
                self._table["head"] = self._row
            else:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    base, aug = write_base_run(root)
    return write_report([base, write_tuned_run(root, aug)], root / "report")["html"]


def test_report_in_headless_chromium(chromium, report_html, tmp_path):
    shot = tmp_path / "shot.png"
    dom, requests = open_in_chromium(chromium, report_html, tmp_path, "--window-size=1280,2400",
                                     f"--screenshot={shot}")
    with Image.open(shot) as im:  # the screenshot: a page was drawn, not a blank one
        im.load()
        assert im.size == (1280, 2400)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    parsed = _Tables()
    parsed.feed(dom)
    assert set(parsed.tables) == set(EXPECTED)
    for key, (n_cols, n_rows) in EXPECTED.items():
        table = parsed.tables[key]
        assert len(table["head"]) == n_cols, (key, table["head"])
        assert len(table["rows"]) == n_rows, (key, table["rows"])
        assert all(len(row) == n_cols for row in table["rows"]), key
    t6 = parsed.tables["table-6"]
    assert t6["head"] == ["model", "figures", "n = 4", "n = 8", "n = 16", "n = 32", "n = 64"]
    assert [row[:2] for row in t6["rows"][:3]] == [[R101, "pixelray"], [R101, "paper"], [R101, "ours − paper"]]
    assert t6["rows"][0][4:6] == ["—", "—"] and t6["rows"][1][4:6] == ["165/10000 · 1.65%", "265/10000 · 2.65%"]
    assert [row[0] for row in t6["rows"][3:]] == ["densenet121"] * 3 + ["mynet", AUG_B, AUG_T, R101_T]
    # every image: an inline PNG that decodes
    assert len(parsed.images) == 6
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300
    # no request leaves the file: none in the DOM, none in the network log
    assert external_refs(dom) == []
    assert page_requests(requests) == []


def test_the_request_check_sees_an_external_image(chromium, tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/x.png"></body></html>')
    dom, requests = open_in_chromium(chromium, page, tmp_path)
    assert external_refs(dom) == [("img", "src", "http://example.invalid/x.png")]
    assert page_requests(requests) == ["http://example.invalid/x.png"]
