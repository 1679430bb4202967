"""The report on hand-made runs: every table cell, interval, Pixel-index and paper comparison against
values computed here by hand (rates as k/n, intervals from scipy's Wilson interval), absent cells shown
as absent, and the files it writes."""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
import sys
from itertools import zip_longest
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from report_fixtures import cell, external_refs, write_base_run, write_tuned_run
from scipy.stats import binomtest

from pixelray.report import build_document, load_runs, write_report
from pixelray.report.paper import header_notes, paper_cells
from pixelray.report.render import ABSENT, grid, render_html, render_markdown
from pixelray.report.tables import PAPER_ROW, build_tables, prepare_cells

R101, R101_T = "resnet101 (base)", "resnet101 (tuned)"
AUG_B, AUG_T = "r101-aug4 (base)", "r101-aug4 (tuned)"


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    base, aug = write_base_run(root)
    return base, write_tuned_run(root, aug)


@pytest.fixture(scope="module")
def tables(runs_dir):
    return {t.key: t for t in build_tables(load_runs(list(runs_dir)))}


@pytest.fixture(scope="module")
def written(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-out") / "report"
    return write_report(list(runs_dir), out)


def check_ours(entry, k: int, n: int) -> None:
    """An entry of ours: its count, rate and 95% Wilson interval, against values computed here."""
    assert entry is not None
    assert (entry["k"], entry["n"]) == (k, n)
    assert entry["value"] == pytest.approx(k / n, abs=1e-12)
    low, high = wilson(k, n)
    assert entry["low"] == pytest.approx(low, abs=1e-9)
    assert entry["high"] == pytest.approx(high, abs=1e-9)


def test_table_6_every_cell(tables):
    t = tables["table-6"]
    assert t.columns == ["n = 4", "n = 8", "n = 16", "n = 32", "n = 64"]  # 16, 32: the paper's columns
    assert t.rows() == [(R101,), ("densenet121",), ("mynet",), (AUG_B,), (AUG_T,), (R101_T,)]
    for row, col, k, n in [(R101, 4, 82, 10000), (R101, 8, 150, 10000), (R101, 64, 416, 10000),
                           ("densenet121", 4, 65, 10000), ("densenet121", 64, 400, 10000),
                           ("mynet", 4, 10, 10000), ("mynet", 64, 20, 10000), (AUG_B, 4, 30, 10000),
                           (AUG_T, 4, 22, 1000), (AUG_T, 8, 40, 1000), (R101_T, 4, 50, 1000)]:
        check_ours(t.cell((row,), f"n = {col}"), k, n)


def test_a_cell_two_experiments_name_is_counted_once(runs_dir, tables):
    # resnet101 n = 4 is in the fixture twice (experiments "count" and "area"): one measurement, 82 wrong
    cells = prepare_cells(load_runs(list(runs_dir)))
    same = cells.query("who == @R101 and count == 4 and amplitude == 'full' and area == 224 and attack.isna()")
    assert list(same["n_wrong"]) == [82]
    assert tables["table-6"].cell((R101,), "n = 4")["k"] == 82


def test_absent_cells_are_absent_not_zero(tables):
    t = tables["table-6"]
    for row, col in [(R101, "n = 16"), (R101, "n = 32"), ("densenet121", "n = 8")]:
        entry = t.cell((row,), col)
        assert math.isnan(entry["value"]) and math.isnan(entry["k"])  # only the paper's figure is there
    assert t.cell(("mynet",), "n = 8") is None
    lines = {(row, kind): cells for row, kind, cells in grid(t)}
    assert lines[((R101,), "ours")] == [
        f"82/10000 · 0.82% [{100 * wilson(82, 10000)[0]:.2f}, {100 * wilson(82, 10000)[1]:.2f}]",
        f"150/10000 · 1.50% [{100 * wilson(150, 10000)[0]:.2f}, {100 * wilson(150, 10000)[1]:.2f}]",
        ABSENT, ABSENT,
        f"416/10000 · 4.16% [{100 * wilson(416, 10000)[0]:.2f}, {100 * wilson(416, 10000)[1]:.2f}]",
    ]
    assert lines[((R101,), "paper")] == ["82/10000 · 0.82%", "116/10000 · 1.16%", "165/10000 · 1.65%",
                                         "265/10000 · 2.65%", "416/10000 · 4.16%"]
    assert lines[(("mynet",), "ours")][1:4] == [ABSENT] * 3
    assert not [c for cells in lines.values() for c in cells if c.startswith("0/")]  # no cell holds 0 here


def test_table_6_paper_comparison(tables):
    t = tables["table-6"]
    same = t.cell((R101,), "n = 4")  # 82 of 10,000 both
    assert (same["paper_k"], same["paper_n"], same["diff"], bool(same["inside"])) == (82, 10000, 0.0, True)
    higher = t.cell((R101,), "n = 8")  # 150 against the paper's 116: 1.16% lies below our interval
    assert higher["diff"] == pytest.approx(0.0150 - 0.0116, abs=1e-12)
    assert wilson(150, 10000)[0] > 0.0116 and not higher["inside"]
    dense = t.cell(("densenet121",), "n = 64")  # 400 against 352
    assert dense["diff"] == pytest.approx(0.0048, abs=1e-12) and not dense["inside"]
    near = t.cell(("densenet121",), "n = 4")
    assert near["paper_k"] == 65 and near["inside"]
    # no paper figure: not a paper model; the paper's model on 1,000 images (the paper evaluated 10,000);
    # a checkpoint (it is not the paper's ResNet)
    for row in ("mynet", R101_T, AUG_B, AUG_T):
        assert t.frame[t.frame["row"] == (row,)]["paper_value"].isna().all(), row
    lines = {(row, kind): cells for row, kind, cells in grid(t)}
    assert lines[((R101,), "diff")] == ["+0.00 pp, inside", "+0.34 pp, OUTSIDE", ABSENT, ABSENT, "+0.00 pp, inside"]
    assert ((("mynet",), "paper")) not in lines


def test_only_the_paper_s_weights_meet_the_paper(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelray.sweep import CELLS_SCHEMA

    run = tmp_path / "v2"
    run.mkdir()
    rows = [cell("resnet101", 4, 10000, 82, weights="default"), cell("vgg16", 4, 10000, 148, weights="none")]
    pq.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), run / "cells.parquet")
    t6 = {t.key: t for t in build_tables(load_runs([run]))}["table-6"]
    assert t6.frame["paper_value"].isna().all() and t6.columns == ["n = 4"]


def test_table_5_pixel_index(tables):
    t = tables["table-5"]
    assert t.columns == ["Pi, n = 4", "Pi, n = 8", "Pi, n = 64", "clean accuracy"]
    scale = 224 * 224 / 64  # Pi = w / (p r a) with p = 64 / 224^2, r = 1, a = 1
    entry = t.cell((R101,), "Pi, n = 64")
    assert entry["value"] == pytest.approx(0.0416 * scale, rel=1e-12)
    assert entry["value"] == pytest.approx(32.6144, abs=1e-9)
    low, high = wilson(416, 10000)
    assert (entry["low"], entry["high"]) == (pytest.approx(low * scale), pytest.approx(high * scale))
    assert entry["paper_value"] == 32.60 and entry["diff"] == pytest.approx(0.0144) and entry["inside"]
    assert "0.1276%" in entry["note"]  # the paper rounds p first
    dense = t.cell(("densenet121",), "Pi, n = 64")
    assert dense["value"] == pytest.approx(31.36) and dense["paper_value"] == 27.58 and not dense["inside"]
    assert t.cell((R101,), "Pi, n = 8")["value"] == pytest.approx(0.015 * 224 * 224 / 8)
    assert math.isnan(t.cell((R101,), "Pi, n = 8")["paper_value"])  # the paper prints Pi at n = 64 only
    check_ours(t.cell((R101,), "clean accuracy"), 18, 20)
    check_ours(t.cell(("densenet121",), "clean accuracy"), 20, 20)
    assert t.cell(("mynet",), "clean accuracy") is None  # not in clean.parquet: absent
    lines = {(row, kind): cells for row, kind, cells in grid(t)}
    assert lines[((R101,), "ours")][2] == f"32.61 [{low * scale:.2f}, {high * scale:.2f}]"
    assert lines[((R101,), "diff")][2] == "+0.01, inside"


def test_table_7_and_8_name_no_model(tables):
    t7 = tables["table-7"]
    assert t7.rows() == [(R101, "±40"), (PAPER_ROW, "±40")]
    check_ours(t7.cell((R101, "±40"), "n = 4"), 13, 10000)
    check_ours(t7.cell((R101, "±40"), "n = 64"), 80, 10000)
    paper = [t7.cell((PAPER_ROW, "±40"), f"n = {n}")["paper_k"] for n in (4, 8, 16, 32, 64)]
    assert paper == [13, 20, 24, 43, 53]
    assert t7.frame["diff"].isna().all()  # never paired with a model of ours
    t8 = tables["table-8"]
    assert t8.rows()[:2] == [(R101, "224 × 224"), (R101, "100 × 100")]
    check_ours(t8.cell((R101, "100 × 100"), "n = 4"), 69, 10000)
    assert t8.cell((PAPER_ROW, "100 × 100"), "n = 64")["paper_k"] == 320
    assert t8.cell((PAPER_ROW, "224 × 224"), "n = 4")["paper_k"] == 100


def test_table_9_misclassified_and_restored(tables):
    t = tables["table-9"]
    eps = "FGSM ε = 2/255"
    check_ours(t.cell((R101, eps, "still misclassified"), "n = 4"), 6697, 10000)
    check_ours(t.cell((R101, eps, "restored"), "n = 4"), 3303, 10000)
    check_ours(t.cell((R101, eps, "restored"), "n = 8"), 5000, 10000)
    assert t.cell((R101, eps, "restored"), "n = 16") is None
    restored = t.cell((PAPER_ROW, "FGSM, ε not printed", "restored"), "n = 4")
    assert (restored["paper_k"], restored["paper_n"]) == (10000 - 6697, 10000)
    assert "first is taken as n = 4" in restored["note"]
    assert t.cell((PAPER_ROW, "FGSM, ε not printed", "still misclassified"), "n = 64")["paper_k"] == 2260
    check_ours(tables["fgsm-success"].cell((R101, "FGSM"), "ε = 2/255"), 10000, 12000)


def test_tables_10_and_11_augmented_models(tables):
    t10 = tables["table-10"]
    assert t10.rows() == [(AUG_B, "4 pixels"), (AUG_T, "4 pixels")]
    tuned = t10.cell((AUG_T, "4 pixels"), "n = 8")  # 40 of 1,000 against ResNet101-4's 21
    check_ours(tuned, 40, 1000)
    assert tuned["paper_k"] == 21 and tuned["diff"] == pytest.approx(0.019) and not tuned["inside"]
    assert t10.cell((AUG_T, "4 pixels"), "n = 4")["inside"]
    assert t10.frame[t10.frame["row"] == (AUG_B, "4 pixels")]["paper_value"].isna().all()  # 10,000 images
    t11 = tables["table-11"]
    eps = "FGSM ε = 2/255"
    assert t11.rows() == [(eps, f"{R101} (attacked)"), (eps, AUG_B)]  # densenet121 judges too, but is not augmented
    check_ours(t11.cell((eps, AUG_B), "misclassified"), 2490, 10000)
    check_ours(t11.cell((eps, AUG_B), "recognised"), 7510, 10000)
    assert t11.cell((eps, AUG_B), "misclassified")["paper_k"] == 2490
    base = t11.cell((eps, f"{R101} (attacked)"), "misclassified")
    assert (base["k"], base["paper_k"], bool(base["inside"])) == (10000, 10000, True)


def test_transfer_matrix(tables):
    t = tables["transfer"]
    eps = "FGSM ε = 2/255"
    check_ours(t.cell((eps, R101), "densenet121"), 4000, 10000)
    check_ours(t.cell((eps, R101), AUG_B), 2490, 10000)
    check_ours(t.cell((eps, "densenet121"), R101), 5000, 10000)
    assert t.cell((eps, "densenet121"), "densenet121") is None


def test_a_plain_run_shows_the_other_tables_as_absent(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelray.sweep import CELLS_SCHEMA

    run = tmp_path / "plain"
    run.mkdir()
    rows = [cell("vgg16", 4, 500, 0), cell("vgg16", 8, 500, 3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), run / "cells.parquet")
    doc = build_document(load_runs([run]))
    by_key = {t.key: t for t in doc.tables}
    check_ours(by_key["table-6"].cell(("vgg16",), "n = 4"), 0, 500)  # 0 wrong is a result, shown as 0
    for key in ("table-7", "table-8", "table-9", "fgsm-success", "table-10", "table-11", "transfer"):
        assert by_key[key].absent, key
    html, md = render_html(doc), render_markdown(doc)
    assert 'id="table-9-absent"' in html and "*Absent: the runs hold no attack" in md
    assert "0/500 · 0.00% [0.00, 0.76]" in md  # wilson(0, 500) = [0, 0.0076]
    assert wilson(0, 500)[1] == pytest.approx(0.0076, abs=5e-5)


def test_reference_file_is_package_data_with_citation_and_misprints():
    from importlib import resources

    assert resources.files("pixelray").joinpath("paper_tables.csv").is_file()
    cells = paper_cells()
    assert [sum(c.table == t for c in cells) for t in (5, 6, 7, 8, 9, 10, 11)] == [5, 25, 25, 25, 5, 25, 2]
    notes = " ".join(header_notes())
    for text in ("doi:10.4236/jsea.2021.144008", "97 wrong but 99.43%", "29 wrong but 97.90%",
                 "copied from Table 1", "the first is taken as n=4"):
        assert text in notes
    a70 = [c for c in cells if c.table == 7 and c.amplitude == "70" and c.count == 16][0]
    assert (a70.wrong, a70.printed_rate) == (97, 99.43) and "57 wrong" in a70.note
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*pixelray = \[[^]]*"paper_tables.csv"', pyproject)


# What each plot must draw, from report_fixtures' hand-made rows: per plot, per (panel title, line label),
# the points (x, k, n), drawn at y = k / n (times ``scale`` for the Pixel-index) with a band at the
# Wilson interval of k/n (scaled likewise). Runs of 10,000 images (base) and 1,000 (tuned).
_B, _T = 10_000, 1000
_PI = 224**2  # Pixel-index at full amplitude on the whole 224 x 224 image: (k / n) / (count / 224^2)
_ALL = "full-range changes anywhere in the image"
_ATTACK = "attack success before any pixel change"
_RESTORED = "resnet101 (base), FGSM: n changed pixels"
_ARCH = "architecture resnet101"
_COUNT_LINES = {
    R101: [(4, 82, _B), (8, 150, _B), (64, 416, _B)],
    "densenet121": [(4, 65, _B), (64, 400, _B)],
    "mynet": [(4, 10, _B), (64, 20, _B)],
    AUG_B: [(4, 30, _B)],
    AUG_T: [(4, 22, _T), (8, 40, _T)],
    R101_T: [(4, 50, _T)],
}
PLOTTED = {
    "count": {(_ALL, who): points for who, points in _COUNT_LINES.items()},
    "pixel-index": {("", who): points for who, points in _COUNT_LINES.items()},
    "amplitude": {(R101, "n = 4"): [(40, 13, _B)], (R101, "n = 64"): [(40, 80, _B)]},
    "area": {(R101, "n = 4"): [(100, 69, _B), (224, 82, _B)], (R101, "n = 8"): [(224, 150, _B)],
             (R101, "n = 64"): [(224, 416, _B)]},
    "fgsm": {(_ATTACK, "resnet101 (base), FGSM"): [(2, 10_000, 12_000)],
             (_RESTORED, "n = 4"): [(2, 3303, _B)], (_RESTORED, "n = 8"): [(2, 5000, _B)]},
    "fine-tuned": {(_ARCH, f"{R101} (no augmentation)"): _COUNT_LINES[R101], (_ARCH, AUG_B): _COUNT_LINES[AUG_B],
                   (_ARCH, AUG_T): _COUNT_LINES[AUG_T], (_ARCH, f"{R101_T} (no augmentation)"): _COUNT_LINES[R101_T]},
}


def drawn(figure) -> tuple[dict, dict]:
    """What a figure draws, read back from matplotlib: per (panel title, line label) the line's (x, y),
    and its band (the fill drawn after it, in the same order) as {x: (lowest y, highest y)}."""
    lines, bands = {}, {}
    for ax in figure.axes:
        if not ax.get_visible():
            continue
        for line, fill in zip_longest(ax.get_lines(), ax.collections):
            key = (ax.get_title(), line.get_label())
            lines[key] = ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
            if fill is not None:
                band: dict[float, list[float]] = {}
                for x, y in fill.get_paths()[0].vertices:
                    band.setdefault(float(x), []).append(float(y))
                bands[key] = {x: (min(ys), max(ys)) for x, ys in band.items()}
    return lines, bands


def test_written_files(written, runs_dir):
    assert {"html", "md"} <= set(written)
    html = written["html"].read_text()
    md = written["md"].read_text()
    plots = {k.split(":", 1)[1]: p for k, p in written.items() if k.startswith("plot:")}
    assert set(plots) == {"count", "pixel-index", "amplitude", "area", "fgsm", "fine-tuned"}
    for key, path in plots.items():
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300 and im.height > 200
        assert f"](plots/{key}.png)" in md
    # what the plots draw: the figures the written PNGs were rendered from, read back, against the rows
    figures = {p.key: p for p in build_document(load_runs(list(runs_dir))).plots}
    assert set(figures) == set(plots)
    for key, path in plots.items():
        assert path.read_bytes() == figures[key].png, key  # the very figure checked below
        lines, bands = drawn(figures[key].figure)
        scale = {"pixel-index": lambda count: _PI / count}.get(key, lambda count: 1.0)
        extra = {("", "Zhang & Cai 2021 (printed)")} if key == "pixel-index" else set()
        assert set(lines) == set(PLOTTED[key]) | extra, key
        for line, points in PLOTTED[key].items():
            assert lines[line][0] == [x for x, _, _ in points], (key, line)
            assert lines[line][1] == pytest.approx([k / n * scale(x) for x, k, n in points], rel=1e-12), (key, line)
            assert sorted(bands[line]) == [x for x, _, _ in points], (key, line)
            for x, k, n in points:
                low, high = wilson(k, n)
                assert bands[line][x] == pytest.approx((low * scale(x), high * scale(x)), rel=1e-9), (key, line, x)
    printed = drawn(figures["pixel-index"].figure)[0][("", "Zhang & Cai 2021 (printed)")]
    assert sorted(zip(*printed, strict=True)) == [(64.0, 27.58), (64.0, 32.60)]  # DenseNet's, ResNet's printed Pi
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == len(plots)
    for data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
    assert external_refs(html) == []  # nothing but data URIs and fragments
    control = '<img src="http://x.invalid/a.png"><a href="#ok"><style>@import "https://x.invalid/a.css";</style>'
    assert [r[:2] for r in external_refs(control)] == [("img", "src"), ("style", "url")]
    assert "Content-Security-Policy" in html and "<script" not in html
    assert "Zhang, Y. and Cai, Z. (2021)" in html and "doi:10.4236/jsea.2021.144008" in md


def test_provenance(written, runs_dir):
    html = written["html"].read_text()
    for text in ("feedc0ffee", "handmade", "manifest.json (sha256", "3 in ", "image_ids.txt", "10.0 s",
                 "throughput", "trained with 4-pixel-change augmentation", "&quot;all&quot;"):
        assert text in html, text
    # the base run's plain cells (deduplicated): 11 cells of 10,000 images, over 10 s
    plain = pd.read_parquet(runs_dir[0] / "cells.parquet").query("attack.isna()")
    cells = plain.drop_duplicates(subset=["model", "count", "amplitude", "area"])
    assert len(cells) == 11 and f"{110_000 / 10:,.0f} cell evaluations per second" in html


def test_model_names_are_escaped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelray.sweep import CELLS_SCHEMA

    run = tmp_path / "run"
    run.mkdir()
    rows = [cell("<img src=http://x.invalid/a.png>", 4, 10, 1)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CELLS_SCHEMA), run / "cells.parquet")
    html = render_html(build_document(load_runs([run])))
    assert "<img src=http" not in html and "&lt;img src=http://x.invalid/a.png&gt;" in html


def test_the_report_imports_neither_ray_nor_torch(runs_dir, tmp_path):
    code = (
        "import sys; from pixelray.report import write_report; "
        f"write_report({[str(p) for p in runs_dir]!r}, {str(tmp_path / 'r')!r}); "
        "bad = [m for m in ('ray', 'torch', 'torchvision', 'pixelray.sweep', 'pixelray.engine.worker') "
        "if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_readme_pandas_recipes_give_the_report_s_counts(runs_dir):
    import ast

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if 'run = "results/paper"' in block)
    tree = ast.parse(code.replace('run = "results/paper"', f"run = {str(runs_dir[0])!r}"))
    results: list = []
    for i, node in enumerate(tree.body):  # keep the value of each table's expression
        if isinstance(node, ast.Expr):
            call = ast.parse("results.append(None)").body[0]
            call.value.args[0] = node.value
            tree.body[i] = call
    exec(compile(ast.fix_missing_locations(tree), "README.md", "exec"), {"results": results})
    t6, _, pi, t7, t8, t9, success, t10, transfer = results
    assert t6.loc["resnet101", 4] == 82 and t6.loc["resnet101", 64] == 416 and t6.loc["densenet121", 64] == 400
    assert t7.loc[("resnet101", "40"), 64] == 80
    assert t8.loc[("resnet101", 100), 4] == 69
    assert t9.loc[("resnet101", 2.0), ("n_restored", 4)] == 3303
    assert success.loc["resnet101", ("success_rate", 2.0)] is None or math.isnan(
        success.loc["resnet101", ("success_rate", 2.0)])  # the hand-made attack.parquet leaves rates empty
    assert list(t10.index) == [m for m in t6.index if m.startswith("checkpoint:")]
    assert transfer.loc[("fgsm", 2.0, "resnet101"), "densenet121"] is None or math.isnan(
        transfer.loc[("fgsm", 2.0, "resnet101"), "densenet121"])
    assert set(pi.index) == set(t6.index)


def test_results_from_before_the_attack_phase_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pixelray.sweep import CELLS_SCHEMA

    run = tmp_path / "old"
    run.mkdir()
    table = pa.Table.from_pylist([cell("vgg16", 4, 100, 7)], schema=CELLS_SCHEMA)
    pq.write_table(table.drop_columns(["n_restored", "restored_rate", "cell_id"]), run / "cells.parquet")
    t6 = {t.key: t for t in build_tables(load_runs([run]))}["table-6"]
    check_ours(t6.cell(("vgg16",), "n = 4"), 7, 100)
