"""``pixelray report``: the paper's tables beside the paper's figures, plots, and provenance.

The report reads results and never runs a model (no Ray, no torch): it loads one
or more sweep output directories (``load``), lays their cells out in the layout of
Zhang & Cai (2021)'s Tables 5-11 with every cell's count, rate and 95% Wilson
interval and the paper's printed figure beside ours where the settings match
(``tables``, ``paper``), adds a "Pixels to failure" section where a run holds
failure.parquet (``survival``, ``failure_section``), draws the rates against
changed pixels, amplitude, area and ε (``plots``), and writes ``report.md``, a self-contained ``report.html`` and
``plots/*.png`` (``render``). Every run directory is checked before anything is
written, so a wrong one leaves no half-written report.

Example::

    from pixelray.report import write_report
    paths = write_report(["results/paper", "results/paper-finetuned"], "results/report")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pixelray.report.failure_section import failure_section
from pixelray.report.load import ModelInfo, ReportError, Run, load_runs
from pixelray.report.paper import citation, header_notes
from pixelray.report.plots import Plot, build_plots
from pixelray.report.provenance import provenance
from pixelray.report.render import Document, Section, render_html, render_markdown
from pixelray.report.tables import Table, build_tables, prepare_cells
from pixelray.store.atomic import write_bytes_atomic, write_text_atomic

__all__ = [
    "FORMATS",
    "Document",
    "ModelInfo",
    "Plot",
    "ReportError",
    "Run",
    "Section",
    "Table",
    "build_document",
    "load_runs",
    "parse_formats",
    "write_report",
]

FORMATS = ("html", "md")


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"html,md"`` -> ("html", "md"); an unknown or empty format raises ReportError naming the valid ones."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ReportError(f"--format: {text!r} is invalid; use a comma-separated list of {', '.join(FORMATS)}")
    return formats


def build_document(runs: list[Run]) -> Document:
    """Tables, plots and provenance of the loaded runs (in memory; nothing is written)."""
    tables = build_tables(runs)
    plots = build_plots(prepare_cells(runs), runs, tables)
    section = failure_section(runs)
    return Document(
        title="pixelray report", runs=[(r.name, str(r.path)) for r in runs], tables=tables, plots=plots,
        provenance=[provenance(r) for r in runs], citation=citation(), paper_notes=header_notes(),
        sections=[section] if section is not None else [],
    )


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, formats: Sequence[str] = FORMATS
) -> dict[str, Path]:
    """Read the runs, build the report and write it under ``out`` (default: ``<first run>/report``).

    Returns the written files by kind (``html``, ``md``, and ``plot:<key>`` for each PNG). Raises
    ReportError, before writing anything, when a run directory is not a finished sweep's.
    """
    formats = parse_formats(formats)
    runs = load_runs(list(run_dirs))
    doc = build_document(runs)
    texts = {"html": render_html(doc) if "html" in formats else None,
             "md": render_markdown(doc) if "md" in formats else None}
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a directory for the report")
    written: dict[str, Path] = {}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for plot in doc.every_plot:
        path = out / "plots" / f"{plot.key}.png"
        write_bytes_atomic(plot.png, path)
        written[f"plot:{plot.key}"] = path
    for kind, name in (("md", "report.md"), ("html", "report.html")):
        if texts[kind] is not None:
            write_text_atomic(texts[kind], out / name)
            written[kind] = out / name
    return written
