"""The building blocks of the report's tables: a Table, the Entries that fill it, and the labels they share.

Each table is a tidy frame with one entry per (row, column): ours (``k`` of ``n``,
``value``, ``low``, ``high``), the paper's figure where the settings match
(``paper_k`` of ``paper_n``, ``paper_value``), their difference and whether the
paper's figure lies inside our interval. An entry's ``measure`` says how it reads:
``rate`` (k of n, a rate and its Wilson interval), ``pi`` (a Pixel-index), ``pixels`` (an
equivalent pixel count), ``count`` (an integer), ``median`` (a pixel count and its interval,
+infinity beyond the ladder's last point ``top``) and ``text`` (a word). Rendering
(``render.py``) lays the frame out in a grid; a cell the run does not hold has no entry, so it
shows as absent, never as zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pixelray.core.metrics import wilson_interval
from pixelray.core.worst import budget_text
from pixelray.report.paper import PaperCell

__all__ = ["Entries", "Table", "count_col", "eps_label", "finish_table"]


@dataclass
class Table:
    """One table of the report: a tidy frame of entries and what the layout needs to show it.

    Attributes:
        key: a short id (``table-6``), used as the HTML id.
        title, caption: what the table shows and what a cell means.
        row_names: headers of the row-label columns (each entry's ``row`` is a tuple of that length).
        columns: the value columns, in order.
        frame: one entry per (row, col); see the module docstring.
        notes: footnotes (the paper's misprints touching this table, what was left out).
        absent: why the table is empty, when it is.
    """

    key: str
    title: str
    caption: str
    row_names: tuple[str, ...]
    columns: list[str]
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    absent: str = ""

    def rows(self) -> list[tuple[str, ...]]:
        return list(dict.fromkeys(self.frame["row"])) if len(self.frame) else []

    def cell(self, row: tuple[str, ...], col: str) -> dict[str, Any] | None:
        """The entry at (row, col) as a dict, or None when the table has none there."""
        hit = self.frame[(self.frame["row"] == row) & (self.frame["col"] == col)] if len(self.frame) else []
        return None if len(hit) == 0 else hit.iloc[0].to_dict()


class Entries:
    """Collects ours and the paper's figures per (row, col), in the order rows and columns first appear."""

    def __init__(self) -> None:
        self.items: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}
        self.col_order: dict[str, float] = {}

    def _at(self, row: tuple[str, ...], col: str, order: float) -> dict[str, Any]:
        self.col_order.setdefault(col, order)
        return self.items.setdefault((row, col), {"row": row, "col": col, "measure": "rate", "note": ""})

    def ours(self, row, col, order, k: int, n: int, **extra) -> None:
        if n < 1:
            return  # nothing evaluated: absent, not a rate of 0
        low, high = wilson_interval(int(k), int(n))
        self._at(row, col, order).update(k=int(k), n=int(n), value=k / n, low=low, high=high, **extra)

    def pi(self, row, col, order, value: float, low: float, high: float, k: int, n: int) -> None:
        self._at(row, col, order).update(measure="pi", k=k, n=n, value=value, low=low, high=high)

    def pixels(self, row, col, order, value: float, low: float | None, high: float | None) -> None:
        """An equivalent pixel count and its interval (None: beyond the measured counts)."""
        self._at(row, col, order).update(measure="pixels", value=value, low=low, high=high)

    def count(self, row, col, order, n: int) -> None:
        """An integer (images, examples): printed as one."""
        self._at(row, col, order).update(measure="count", n=int(n), value=float(n))

    def median(self, row, col, order, value: float, low: float, high: float, n: int, top: int) -> None:
        """A median pixel count and its interval; +infinity (beyond the ladder's last point ``top``) reads "> top"."""
        self._at(row, col, order).update(measure="median", n=int(n), value=value, low=low, high=high, top=int(top))

    def text(self, row, col, order, text: str, value: float) -> None:
        """A word (``text``) standing for ``value`` (e.g. "yes" for 1.0)."""
        self._at(row, col, order).update(measure="text", text=text, value=float(value))

    def paper(self, row, col, order, cell: PaperCell, *, k: int | None = None, pi: bool = False,
              note: bool = True) -> None:
        entry = self._at(row, col, order)
        if pi:
            entry.update(paper_value=cell.printed_pi, paper_n=cell.n_images)
        else:
            k = cell.wrong if k is None else k
            entry.update(paper_k=k, paper_n=cell.n_images, paper_value=k / cell.n_images)
        if cell.note and note:
            entry["note"] = cell.note

    def frame(self) -> tuple[pd.DataFrame, list[str]]:
        cols = ["row", "col", "measure", "k", "n", "value", "low", "high", "paper_k", "paper_n", "paper_value",
                "note", "diff", "inside", "top", "text"]
        df = pd.DataFrame(list(self.items.values()), columns=cols)
        both = df["value"].notna() & df["paper_value"].notna()
        df["diff"] = np.where(both, df["value"] - df["paper_value"], np.nan)
        df["inside"] = pd.array([(lo <= p <= hi) if b else pd.NA for b, lo, p, hi in
                                 zip(both, df["low"], df["paper_value"], df["high"], strict=True)], dtype="boolean")
        df["order"] = df["col"].map(self.col_order)  # the column's number (count, eps k, ...) where it has one
        columns = sorted(self.col_order, key=lambda c: self.col_order[c])
        return df, columns


def count_col(count: int | float) -> str:
    """A count's column: an integer, whatever the column's dtype (a count column with nulls reads as float)."""
    return f"n = {int(count)}"


def eps_label(eps: float, attack: str = "fgsm") -> str:
    return f"{attack.upper()} {budget_text(eps, attack)}"


def finish_table(key, title, caption, row_names, entries: Entries, notes=(), absent="") -> Table:
    frame, columns = entries.frame()
    return Table(key, title, caption, row_names, columns, frame, list(notes), "" if len(frame) else absent)
