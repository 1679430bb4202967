"""The report's plots as PNG bytes: rates with their 95% Wilson bands, one line per model.

Matplotlib's object API on the Agg canvas (no pyplot, no global state, no
display): each function takes the prepared cells (``tables.prepare_cells``) or a
run's tables and returns None when the runs hold nothing to draw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, ScalarFormatter

from pixelray.core.metrics import wilson_interval
from pixelray.core.worst import PIXEL_ATTACKS
from pixelray.report.load import Run
from pixelray.report.tables import Table

__all__ = ["Plot", "build_plots", "plot_survival"]

_DPI = 100
_PERCENT = FuncFormatter(lambda y, _: f"{100 * y:g}%")
_MAX_PANELS = 6


@dataclass(frozen=True)
class Plot:
    """One PNG of the report: ``key`` names its file (``plots/<key>.png``).

    ``figure`` is the matplotlib figure ``png`` was rendered from, so that what a plot draws
    can be read back (its axes' lines and bands); it is not part of a plot's value.
    """

    key: str
    title: str
    caption: str
    png: bytes
    figure: Figure | None = field(default=None, repr=False, compare=False)


def _rates(k: pd.Series, n: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bounds = np.array([wilson_interval(int(a), int(b)) for a, b in zip(k, n, strict=True)]).reshape(-1, 2)
    return (k / n).to_numpy(float), bounds[:, 0], bounds[:, 1]


def _line(ax, x, k, n, label: str) -> None:
    """A rate against x with markers and its Wilson band."""
    keep = n.to_numpy() > 0
    x, k, n = np.asarray(x)[keep], k[keep], n[keep]
    if not len(x):
        return
    rate, low, high = _rates(k, n)
    (line,) = ax.plot(x, rate, marker="o", ms=4, lw=1.5, label=label)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, lw=0)


def _log2_x(ax, values) -> None:
    values = sorted(set(int(v) for v in values))
    if len(values) > 1 and min(values) > 0 and max(values) / min(values) >= 4:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))


def _figure(panels: int = 1) -> tuple[Figure, list]:
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.2 * cols + 1.2, 3.4 * rows + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _style(ax, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(_PERCENT)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


_COUNT_X = "changed pixels per image, n (log2 scale)"
_WRONG_Y = "misclassified (% of evaluated)"


def _plain(c: pd.DataFrame) -> pd.DataFrame:
    return c[c["attack"].isna()]


def plot_count(c: pd.DataFrame) -> Plot | None:
    df = _plain(c)
    df = df[(df["amplitude"] == "full") & df["whole"]]
    if df.empty:
        return None
    fig, (ax,) = _figure()
    for who, g in df.groupby("who", sort=False):
        g = g.sort_values("count")
        _line(ax, g["count"], g["n_wrong"], g["n_images"], who)
    _log2_x(ax, df["count"])
    _style(ax, _COUNT_X, _WRONG_Y, "full-range changes anywhere in the image")
    return Plot("count", "Misclassified against changed pixels (the paper's Figure 8)",
                "One line per model; the band is the 95% Wilson interval.", _png(fig), fig)


def _panels(df: pd.DataFrame, x: str, xlabel: str, key: str, title: str, caption: str, log2: bool = False):
    whos = list(dict.fromkeys(df["who"]))[:_MAX_PANELS]
    fig, axes = _figure(len(whos))
    for ax, who in zip(axes, whos, strict=True):
        mine = df[df["who"] == who]
        for count, g in mine.groupby("count"):
            g = g.sort_values(x)
            _line(ax, g[x], g["n_wrong"], g["n_images"], f"n = {int(count)}")
        if log2:
            _log2_x(ax, mine[x])
        _style(ax, xlabel, _WRONG_Y, who)
    return Plot(key, title, caption, _png(fig), fig)


def plot_amplitude(c: pd.DataFrame) -> Plot | None:
    df = _plain(c)
    df = df[(df["amplitude"] != "full") & df["whole"]]
    if df.empty:
        return None
    df = df.assign(a=df["amplitude"].astype(int))
    return _panels(df, "a", "shift amplitude a (values changed by up to ±a of 255)", "amplitude",
                   "Misclassified against the shift amplitude (the paper's Figure 9)",
                   f"One panel per model (at most {_MAX_PANELS}), one line per n; bands: 95% Wilson intervals.")


def plot_area(c: pd.DataFrame) -> Plot | None:
    df = _plain(c)
    df = df[df["amplitude"] == "full"]
    if df.empty or df["whole"].all():
        return None
    df = df[df.groupby("who")["whole"].transform("min") == 0]  # models with a restricted area only
    df = df.assign(side=df["area"].fillna(df["image_size"]).astype(int))
    return _panels(df, "side", "side of the centred square the changes lie in (px)", "area",
                   "Misclassified against the changed area (the paper's Figure 10)",
                   f"One panel per model (at most {_MAX_PANELS}), one line per n; bands: 95% Wilson intervals.")


def plot_pixel_index(table5: Table) -> Plot | None:
    pi = table5.frame[table5.frame["measure"] == "pi"] if len(table5.frame) else table5.frame
    ours = pi[pi["value"].notna()] if len(pi) else pi
    if ours.empty:
        return None
    fig, (ax,) = _figure()
    for row, g in ours.groupby("row", sort=False):
        g = g.sort_values("order")
        (line,) = ax.plot(g["order"], g["value"], marker="o", ms=4, lw=1.5, label=row[0])
        ax.fill_between(g["order"], g["low"], g["high"], color=line.get_color(), alpha=0.18, lw=0)
    paper = pi[pi["paper_value"].notna()]
    if len(paper):
        ax.plot(paper["order"], paper["paper_value"], "kx", ms=8, label="Zhang & Cai 2021 (printed)")
    _log2_x(ax, ours["order"])
    _style(ax, _COUNT_X, "Pixel-index Pi = w / (p × r × a)")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    return Plot("pixel-index", "Pixel-index per model (Table 5)",
                "Smaller is more robust; the band is the 95% interval (Wilson on the misclassified fraction, "
                "scaled).", _png(fig), fig)


def plot_fgsm(c: pd.DataFrame, runs: list[Run]) -> Plot | None:
    attack = [r.attack.assign(who=r.attack["model"].map(lambda m, r=r: r.models[m].label if m in r.models else m))
              for r in runs if r.attack is not None and len(r.attack)]
    adv = c[c["attack"].notna() & (c["amplitude"] == "full") & c["whole"]]
    if not attack and adv.empty:
        return None
    panels = list(dict.fromkeys(zip(adv["who"], adv["attack"], strict=True)))[: _MAX_PANELS - 1]
    fig, axes = _figure(1 + len(panels))
    eps_x = "attack radius ε (k/255, log2 scale)"
    for df in attack:
        df = df[~df["attack"].isin(PIXEL_ATTACKS)]  # a radius axis: attacks on pixel counts have their tables
        for (who, name), g in df.groupby(["who", "attack"], sort=False):
            g = g.sort_values("eps")
            _line(axes[0], (g["eps"] * 255).round(), g["n_success"], g["n_attacked"], f"{who}, {name.upper()}")
            _log2_x(axes[0], (g["eps"] * 255).round())
    _style(axes[0], eps_x, "attack success (% of attacked)", "attack success before any pixel change")
    for ax, (who, name) in zip(axes[1:], panels, strict=True):
        mine = adv[(adv["who"] == who) & (adv["attack"] == name)]
        for count, g in mine.groupby("count"):
            g = g.sort_values("eps")
            _line(ax, g["eps_k"], g["n_restored"], g["n_images"], f"n = {int(count)}")
        _log2_x(ax, mine["eps_k"])
        _style(ax, eps_x, "restored to the true class (% of kept)", f"{who}, {name.upper()}: n changed pixels")
    return Plot("fgsm", "Attack success and restored rate against ε (Table 9)",
                "First panel: each attack's success rate per model; then, per model and attack, the share of its "
                "kept adversarial examples that n changed pixels return to the true class. Bands: 95% Wilson "
                "intervals.", _png(fig), fig)


def plot_fine_tuned(c: pd.DataFrame) -> Plot | None:
    df = _plain(c)
    df = df[(df["amplitude"] == "full") & df["whole"]]
    tuned = df[df["augment_count"].notna()]
    bases = list(dict.fromkeys(tuned["base"]))[:_MAX_PANELS]
    if not bases:
        return None
    fig, axes = _figure(len(bases))
    for ax, base in zip(axes, bases, strict=True):
        mine = df[df["base"] == base]
        for who, g in mine.groupby("who", sort=False):
            g = g.sort_values("count")
            aug = g["augment_count"].iloc[0]
            _line(ax, g["count"], g["n_wrong"], g["n_images"], who + (" (no augmentation)" if pd.isna(aug) else ""))
        _log2_x(ax, mine["count"])
        _style(ax, _COUNT_X, _WRONG_Y, f"architecture {base}")
    return Plot("fine-tuned", "Base against augmented models (Table 10)",
                "Per architecture: the models trained with n-pixel-change augmentation beside the others. "
                "Bands: 95% Wilson intervals.", _png(fig), fig)


def _log2_powers_x(ax, values) -> None:
    """A log2 x axis ticked at the powers of two the values span (a ladder has too many points to tick each)."""
    low, high = int(min(values)), int(max(values))
    ax.set_xscale("log", base=2)
    powers = [2**i for i in range(low.bit_length() - 1, high.bit_length()) if low <= 2**i <= high] or [low]
    ax.set_xticks(powers[:: -(-len(powers) // 9)])  # at most 9 ticks: 1, 4, 16, ... on a long ladder
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))


def plot_survival(curves: pd.DataFrame) -> Plot | None:
    """Every survival curve in one figure: ``curves`` has one row per (curve ``who``, ladder point ``count``)
    with ``survival`` and its Wilson band ``low`` .. ``high`` (``survival.survival_curves``, labelled)."""
    if curves.empty:
        return None
    fig, (ax,) = _figure()
    for who, g in curves.groupby("who", sort=False):
        g = g.sort_values("count")
        (line,) = ax.plot(g["count"], g["survival"], marker="o", ms=3, lw=1.5, label=who)
        ax.fill_between(g["count"], g["low"], g["high"], color=line.get_color(), alpha=0.18, lw=0)
    _log2_powers_x(ax, curves["count"])
    ax.set_ylim(-0.02, 1.02)
    _style(ax, "k, the first k changed pixels of the image's ladder (log2 scale)", "still correct (% of images)",
           "pixels to failure: survival on the ladder")
    return Plot("survival", "Pixels to failure: share of images still correct after their first k changes",
                "One line per model and ladder: at each ladder point k, the share of the images the model "
                "classifies correctly unchanged that no point up to k broke. Bands: 95% Wilson intervals.",
                _png(fig), fig)


def build_plots(c: pd.DataFrame, runs: list[Run], tables: list[Table]) -> list[Plot]:
    """Every plot the runs have data for, in the report's order."""
    table5 = next(t for t in tables if t.key == "table-5")
    plots = [plot_count(c), plot_pixel_index(table5), plot_amplitude(c), plot_area(c), plot_fgsm(c, runs),
             plot_fine_tuned(c)]
    return [p for p in plots if p is not None]
