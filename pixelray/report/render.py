"""Markdown and self-contained HTML from the report's tables, plots and provenance.

Both lay each table out in the paper's grid: per row of ours a ``pixelray`` line,
and where the paper printed the same setting a ``paper`` line and an
``ours − paper`` line (the difference, and whether the paper's figure lies inside
our 95% interval). The HTML inlines its CSS and its PNGs (data URIs) and carries a
Content-Security-Policy that forbids any other source, so it opens offline and
fetches nothing. Every string from a results file is escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pixelray.report.plots import Plot
from pixelray.report.provenance import Provenance
from pixelray.report.tables import Table

__all__ = ["ABSENT", "Document", "Section", "grid", "render_html", "render_markdown"]

#: What a cell the run does not hold shows (never 0).
ABSENT = "—"
KINDS = {"ours": "pixelray", "paper": "paper", "diff": "ours − paper"}


@dataclass(frozen=True)
class Section:
    """A part of the report beyond the paper's tables: a heading, a few sentences, its tables and plots."""

    key: str
    title: str
    text: Sequence[str]
    tables: list[Table]
    plots: list[Plot]


@dataclass(frozen=True)
class Document:
    """Everything a report shows."""

    title: str
    runs: list[tuple[str, str]]  # (name, path)
    tables: list[Table]
    plots: list[Plot]
    provenance: list[Provenance]
    citation: str
    paper_notes: Sequence[str]
    sections: list[Section] = field(default_factory=list)

    @property
    def every_plot(self) -> list[Plot]:
        """The plots of the Plots part, then those of each section (each one a file plots/<key>.png)."""
        return [*self.plots, *(p for s in self.sections for p in s.plots)]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _num(x: Any) -> bool:
    return x is not None and not pd.isna(x)


def _pixel_count(x: float, top: Any) -> str:
    """A pixel count as an integer; +infinity (beyond the ladder's last point) as "> top"."""
    return f"> {int(top)}" if math.isinf(x) else f"{int(x)}"


def _ours_other(entry: dict[str, Any]) -> str | None:
    """Our cell text for the measures beyond rates and Pi (a count, a median pixel count, a word), else None."""
    if entry["measure"] == "count":
        return f"{int(entry['value'])}"
    if entry["measure"] == "median":
        top = entry["top"]
        return (f"{_pixel_count(entry['value'], top)} [{_pixel_count(entry['low'], top)}, "
                f"{_pixel_count(entry['high'], top)}]")
    if entry["measure"] == "text":
        return str(entry["text"])
    return None


def format_cell(entry: dict[str, Any] | None, kind: str) -> str:
    """The text of one grid cell: ours, the paper's figure, or their difference; ABSENT where there is none."""
    if entry is None:
        return ABSENT
    pi = entry["measure"] == "pi"
    if kind == "ours":
        if not _num(entry.get("value")):
            return ABSENT
        other = _ours_other(entry)
        if other is not None:
            return other
        if entry["measure"] == "pixels":
            low = f"{entry['low']:.0f}" if _num(entry.get("low")) else "<"
            high = f"{entry['high']:.0f}" if _num(entry.get("high")) else ">"
            return f"{entry['value']:.0f} px [{low}, {high}]"
        if pi:
            return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"
        low, high = 100 * entry["low"], 100 * entry["high"]
        return f"{int(entry['k'])}/{int(entry['n'])} · {_pct(entry['value'])} [{low:.2f}, {high:.2f}]"
    if kind == "paper":
        if not _num(entry.get("paper_value")):
            return ABSENT
        mark = " †" if entry.get("note") else ""
        if pi:
            return f"{entry['paper_value']:.2f}{mark}"
        return f"{int(entry['paper_k'])}/{int(entry['paper_n'])} · {_pct(entry['paper_value'])}{mark}"
    if not _num(entry.get("diff")):
        return ABSENT
    where = "inside" if bool(entry["inside"]) else "OUTSIDE"
    return f"{entry['diff']:+.2f}, {where}" if pi else f"{100 * entry['diff']:+.2f} pp, {where}"


def grid(table: Table) -> list[tuple[tuple[str, ...], str, list[str]]]:
    """The table's lines in the paper's layout: (row labels, kind, cell texts in column order)."""
    df = table.frame
    lines = []
    for row in table.rows():
        mine = df[df["row"] == row]
        entries = {e["col"]: e for e in mine.to_dict("records")}
        for kind, column in (("ours", "value"), ("paper", "paper_value"), ("diff", "diff")):
            if mine[column].notna().any():
                lines.append((row, kind, [format_cell(entries.get(col), kind) for col in table.columns]))
    return lines


def _notes_of(table: Table) -> list[str]:
    """The table's notes, then one line per distinct cell note (†) naming the cells it marks."""
    marked: dict[str, list[str]] = {}
    for entry in table.frame[table.frame["note"] != ""].to_dict("records") if len(table.frame) else []:
        marked.setdefault(entry["note"], []).append(f"{' / '.join(entry['row'])}, {entry['col']}")
    return list(table.notes) + [f"† {note} ({'; '.join(where)})" for note, where in marked.items()]


# ---------------------------------------------------------------------------- markdown

def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    out = [f"### {_md(table.title)}", "", _md(table.caption), ""]
    if table.absent:
        return out + [f"*Absent: {_md(table.absent)}.*", ""]
    head = [*table.row_names, "figures", *table.columns]
    out += ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    previous = None
    for row, kind, cells in grid(table):
        labels = [_md(x) for x in row] if row != previous else [""] * len(row)
        previous = row
        out.append("| " + " | ".join([*labels, KINDS[kind], *(_md(c) for c in cells)]) + " |")
    out.append("")
    out += [f"- {_md(n)}" for n in _notes_of(table)]
    return out + [""]


def _md_plot(plot: Plot) -> list[str]:
    return [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.key}.png)", "", plot.caption, ""]


def render_markdown(doc: Document) -> str:
    """report.md: the tables as pipe tables, the plots as ``plots/<key>.png`` beside it."""
    out = [f"# {doc.title}", "", "Runs: " + ", ".join(f"`{p}`" for _, p in doc.runs), "",
           f"Paper: {doc.citation}", "", "## Tables", ""]
    for table in doc.tables:
        out += _md_table(table)
    for section in doc.sections:
        out += [f"## {_md(section.title)}", ""] + [line for text in section.text for line in (_md(text), "")]
        for table in section.tables:
            out += _md_table(table)
        for plot in section.plots:
            out += _md_plot(plot)
    out += ["## Plots", ""]
    for plot in doc.plots:
        out += _md_plot(plot)
    out += ["## Provenance", ""]
    for prov in doc.provenance:
        out += [f"### {prov.run} (`{prov.path}`)", ""]
        out += [f"- {_md(k)}: {_md(v)}" for k, v in prov.items]
        out += ["", "```json", prov.config_json, "```", ""]
    out += ["## About the paper's figures", ""] + [f"    {line}" for line in doc.paper_notes] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 0.4em; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f3f3f3; } th.label, td.label { text-align: left; }
tr.paper td { color: #555; background: #fafaf4; } tr.diff td { color: #555; font-size: 0.92em; }
td.absent { color: #aaa; text-align: center; } td.outside { color: #b00; font-weight: bold; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.caption, .notes { font-size: 0.88em; color: #444; } .absent-table { color: #777; font-style: italic; }
dl.prov { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.88em; }
dl.prov dt { font-weight: bold; } dl.prov dd { margin: 0; word-break: break-all; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table: Table) -> list[str]:
    out = [f'<section class="table" id="{_e(table.key)}-section">', f"<h3>{_e(table.title)}</h3>",
           f'<p class="caption">{_e(table.caption)}</p>']
    if table.absent:
        return out + [f'<p class="absent-table" id="{_e(table.key)}-absent">Absent: {_e(table.absent)}.</p>',
                      "</section>"]
    lines = grid(table)
    out.append(f'<div class="scroll"><table id="{_e(table.key)}" data-rows="{len(lines)}" '
               f'data-columns="{len(table.columns)}">')
    heads = [f'<th class="label" scope="col">{_e(h)}</th>' for h in (*table.row_names, "figures")]
    heads += [f'<th scope="col" data-col="{_e(c)}">{_e(c)}</th>' for c in table.columns]
    out += ["<thead><tr>" + "".join(heads) + "</tr></thead>", "<tbody>"]
    for row, kind, cells in lines:
        labels = "".join(f'<th class="label" scope="row">{_e(x)}</th>' for x in row)
        tds = []
        for col, text in zip(table.columns, cells, strict=True):
            cls = "absent" if text == ABSENT else ("outside" if text.endswith("OUTSIDE") or text == "NO" else "")
            tds.append(f'<td data-col="{_e(col)}" class="{cls}">{_e(text)}</td>')
        out.append(f'<tr class="{kind}" data-kind="{kind}" data-row="{_e(" / ".join(row))}">{labels}'
                   f'<td class="label">{_e(KINDS[kind])}</td>{"".join(tds)}</tr>')
    out += ["</tbody>", "</table></div>"]
    notes = _notes_of(table)
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return out + ["</section>"]


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_plot(plot: Plot) -> list[str]:
    return [f'<figure id="plot-{_e(plot.key)}">', f"<h3>{_e(plot.title)}</h3>",
            f'<img src="{_png_uri(plot.png)}" alt="{_e(plot.title)}">',
            f'<figcaption class="caption">{_e(plot.caption)}</figcaption>', "</figure>"]


def render_html(doc: Document) -> str:
    """report.html: one file, CSS and images inline, no script, no external source."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{_e(doc.title)}</h1>",
           "<p>Runs: " + ", ".join(f"<code>{_e(p)}</code>" for _, p in doc.runs) + "</p>",
           f"<p>Paper: {_e(doc.citation)}</p>",
           '<nav><a href="#tables">Tables</a> · '
           + "".join(f'<a href="#{_e(s.key)}">{_e(s.title)}</a> · ' for s in doc.sections)
           + '<a href="#plots">Plots</a> · <a href="#provenance">Provenance</a> · '
           '<a href="#paper-notes">About the paper\'s figures</a></nav>',
           '<h2 id="tables">Tables</h2>']
    for table in doc.tables:
        out += _html_table(table)
    for section in doc.sections:
        out += [f'<h2 id="{_e(section.key)}">{_e(section.title)}</h2>']
        out += [f'<p class="section-text">{_e(text)}</p>' for text in section.text]
        for table in section.tables:
            out += _html_table(table)
        for plot in section.plots:
            out += _html_plot(plot)
    out.append('<h2 id="plots">Plots</h2>')
    for plot in doc.plots:
        out += _html_plot(plot)
    out.append('<h2 id="provenance">Provenance</h2>')
    for prov in doc.provenance:
        out += [f"<h3>{_e(prov.run)} <code>{_e(prov.path)}</code></h3>", '<dl class="prov">']
        out += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in prov.items]
        out += ["</dl>", "<details><summary>config (run.json)</summary>", f"<pre>{_e(prov.config_json)}</pre>",
                "</details>"]
    out += ['<h2 id="paper-notes">About the paper\'s figures</h2>',
            f"<pre>{_e(chr(10).join(doc.paper_notes))}</pre>", "</body>", "</html>", ""]
    return "\n".join(out)
