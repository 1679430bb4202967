"""The report's "Pixels to failure" section, from the runs' failure.parquet (absent without one).

Three tables and one plot, each from a pure function of ``survival``: the median pixels to failure per
model and ladder, with base, ``aug = none`` control and augmented models side by side (the families of
Tables 10 and 11: ``ModelInfo.derived`` and ``fine_tuned_from``); the pixels that restore each attack's kept
adversarial examples (the dual of Table 9); the ladders' survival beside the grid's correct rate at the
counts both measured; and the survival curves (``plots.plot_survival``).
"""

from __future__ import annotations

import json

import pandas as pd

from pixelray.report.entries import Entries, Table, count_col, eps_label, finish_table
from pixelray.report.load import ModelInfo, Run
from pixelray.report.plots import plot_survival
from pixelray.report.render import Section
from pixelray.report.survival import agreement, failure_medians, random_rows, survival_curves, worst_vs_random

__all__ = ["SECTION_TEXT", "agreement_table", "failure_frame", "failure_section", "median_table", "restore_table",
           "worst_table"]

SECTION_TEXT = (
    "Pixels to failure: for each image a model classifies correctly unchanged, the smallest number of randomly "
    "changed pixels that makes the model misclassify it, searched on a nested ladder (the image with its first "
    "k + 1 changes is the image with its first k changes and one more).",
    "The survival at a grid count (the share of images no ladder point up to that count broke) and that grid "
    "cell's correct rate estimate the same probability when an image, once broken, stays broken: the ladder "
    "counts an image broken from its first failing point on.",
)
_ROLE_NONE = "—"
_MEDIAN = ("Median: the ⌈n/2⌉-th smallest count; its interval [x_(j), x_(k)] is two order statistics with "
           "ranks from Binomial(n, 1/2), covering the median with probability >= 95% whatever the distribution "
           "('> m': beyond the ladder's last point m; a lower bound of 0: too few images for an order statistic).")
_WHICH = ("The counts are n_fail_refined (the first flipped integer count) on ladders marked 'refined', else n_fail "
          "(the first failing ladder point: an upper bound on the integer count).")


def failure_frame(runs: list[Run]) -> pd.DataFrame:
    """Every run's failure.parquet rows in one frame, with a ``run`` column (empty: no run has one)."""
    frames = [r.failure.assign(run=r.name) for r in runs if r.failure is not None and len(r.failure)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _family(key: tuple[str, str], infos: dict[tuple[str, str], ModelInfo], bases: list) -> tuple[int, int, str]:
    """(family, place in it, role) of a derived model: after its base (same run first), control before augmented."""
    info = infos[key]
    homes = [b for b in bases if b[0] == key[0]] + [b for b in bases if b[0] != key[0]]
    home = next((b for b in homes if info.fine_tuned_from(infos[b])), None)
    family = bases.index(home) if home is not None else len(bases) + list(infos).index(key)
    if info.fine_tuned:
        return family, 2 + int(info.augment_count), f"augmented ({info.augment_count} pixels)"
    return family, 1, "control (aug = none)"


def _roles(runs: list[Run], frame: pd.DataFrame) -> dict[tuple[str, str], tuple[int, int, str]]:
    """Per (run, model) of ``frame``: its family, place and role (base / control / augmented; "—" alone)."""
    infos = {key: next(r for r in runs if r.name == key[0]).models[key[1]]
             for key in dict.fromkeys(zip(frame["run"], frame["model"], strict=True))}
    bases = [key for key, info in infos.items() if not info.derived]
    out = {}
    for key, info in infos.items():
        if info.derived:
            out[key] = _family(key, infos, bases)
        else:
            has = any(other.derived and other.fine_tuned_from(info) for other in infos.values())
            out[key] = (bases.index(key), 0, "base" if has else _ROLE_NONE)
    return out


def _in_families(runs: list[Run], frame: pd.DataFrame | None) -> tuple[pd.DataFrame, dict]:
    """``frame``'s rows (one per run and model) with families together, and each (run, model)'s role."""
    if frame is None or not len(frame):
        return pd.DataFrame(), {}
    roles = _roles(runs, frame)
    place = [roles[(r, m)][:2] for r, m in zip(frame["run"], frame["model"], strict=True)]
    return frame.iloc[sorted(range(len(frame)), key=lambda i: place[i])], roles


def _label(runs: list[Run], run: str, model: str) -> str:
    return next(r for r in runs if r.name == run).models[model].label


def _ladder_text(r) -> str:
    refined = ", refined" if r.refined else ""
    return f"{r.ladder_id}, {int(r.steps_per_octave)}/octave to {int(r.max_count)}, {r.search}{refined}"


def median_table(runs: list[Run], frame: pd.DataFrame) -> Table:
    """Median pixels to failure per model and ladder, families together (base, control, augmented)."""
    e = Entries()
    medians, roles = _in_families(runs, failure_medians(random_rows(frame), "wrong") if len(frame) else None)
    for r in medians.itertuples(index=False):
        row = (_label(runs, r.run, r.model), roles[(r.run, r.model)][2], _ladder_text(r))
        e.count(row, "n images", 0, r.n)
        e.median(row, "median pixels to failure [95% CI]", 1, r.median, r.low, r.high, r.n, r.top)
        e.ours(row, "survived every point", 2, r.n_survived, r.n)
    return finish_table(
        "failure-median", "Pixels to failure: median per model",
        "Per model and ladder, over the images it classifies correctly unchanged: how many, the median number "
        "of changed pixels that breaks one [95% interval], and those no point up to the ladder's last broke "
        "(of evaluated · rate [95% Wilson interval]). Roles: a base model, its fine-tune without augmentation "
        "(aug = none, the control) and its fine-tunes with n-pixel-change augmentation, side by side.",
        ("model", "role", "ladder"), e, [_MEDIAN, _WHICH], absent="the runs hold no pixels-to-failure ladder")


def worst_table(runs: list[Run], frame: pd.DataFrame) -> Table:
    """Random against worst-case pixels to failure per model (families together): does the augmentation, trained
    on random changes, move the worst case too, or only the random case?"""
    e = Entries()
    pairs, roles = _in_families(runs, worst_vs_random(frame) if len(frame) else None)
    for r in pairs.itertuples(index=False):
        budget = json.loads(r.attack_params).get("budget") if isinstance(r.attack_params, str) else None
        row = (_label(runs, r.run, r.model), roles[(r.run, r.model)][2], f"{r.random_ladder}; search budget {budget}")
        e.median(row, "random: median [95% CI]", 0, r.random_median, r.random_low, r.random_high, r.n_random,
                 r.random_top)
        e.median(row, "worst case: median [95% CI]", 1, r.worst_median, r.worst_low, r.worst_high, r.n_worst,
                 r.worst_top)
        e.ours(row, "worst case <= random", 2, r.n_worst_le_random, r.n_both)
    return finish_table(
        "failure-worst", "Pixels to failure: random against worst case",
        "Per model: the median number of randomly changed pixels that breaks an image (its random ladder) beside "
        "the median number a sparse search needs (the smallest ladder point at which it finds an example within "
        "its budget of forward passes per point), each [95% interval]; and over the images both broke, how "
        "often the search needed no more pixels (of both · rate [95% Wilson interval]). Roles as above: does "
        "the augmentation move the worst case, or only the random case?",
        ("model", "role", "random ladder"), e,
        [_MEDIAN, "The worst case is an upper bound on the fewest pixels that break an image: a search that finds "
                  "nothing at k within its budget may have missed an example a longer search would find."],
        absent="the runs hold no worst-case ladder ([attack] kind = 'sparse' with ladder = true)")


def _attack_text(r, params_vary: bool) -> str:
    text = eps_label(r.eps, r.attack)
    return f"{text} {r.attack_params}" if params_vary and isinstance(r.attack_params, str) else text


def restore_table(runs: list[Run], frame: pd.DataFrame) -> Table:
    """Median pixels that restore the kept adversarial examples, per model, attack and ε."""
    e = Entries()
    medians = failure_medians(frame, "right") if len(frame) else pd.DataFrame()
    if len(medians):
        medians = medians.sort_values(["attack", "eps"], kind="stable")
        vary = medians.groupby("attack")["attack_params"].transform(lambda s: s.astype(str).nunique() > 1)
        medians = medians.assign(vary=vary)
    for r in medians.itertuples(index=False):
        row = (_label(runs, r.run, r.model), _attack_text(r, r.vary), _ladder_text(r))
        e.count(row, "n examples", 0, r.n)
        e.median(row, "median pixels to restore [95% CI]", 1, r.median, r.low, r.high, r.n, r.top)
        e.ours(row, "never restored", 2, r.n_survived, r.n)
    return finish_table(
        "failure-restore", "Pixels to restore: median per model, attack and ε",
        "The dual of Table 9: per model, attack and ε, its kept adversarial examples, the median number of "
        "changed pixels (on the ladder) that brings one back to its true class [95% interval], and those no "
        "point up to the ladder's last restored (of kept · rate [95% Wilson interval]).",
        ("model", "attack", "ladder"), e, [_MEDIAN, _WHICH],
        absent="the runs hold no ladder over adversarial examples (target 'right')")


def agreement_table(runs: list[Run]) -> Table:
    """The ladders' survival beside the grid's correct rate at each count both measured."""
    e = Entries()
    for run in runs:
        if run.failure is None:
            continue
        for r in agreement(run.failure, run.cells).itertuples(index=False):
            row = (run.models[r.model].label, r.ladder_id, count_col(r.count))
            e.ours(row, "ladder: still correct", 0, round(r.survival * r.n_ladder), r.n_ladder)
            e.ours(row, "grid: correct rate", 1, round(r.grid_correct * r.n_grid), r.n_grid)
            e.text(row, "intervals overlap", 2, "yes" if r.agree else "NO", float(r.agree))
    return finish_table(
        "failure-agreement", "Pixels to failure against the grid",
        "At each count both measured with the same model, weights and change (amplitude, area, channels, seed): "
        "the ladder's share of images no point up to n broke, and the grid cell's correct rate (1 − wrong "
        "rate), each k of n · rate [95% Wilson interval]; 'NO': the intervals do not overlap.",
        ("model", "ladder", "changed pixels"), e,
        ["The grid draws new random pixels at each count; the ladder nests them. The two agree when an image, "
         "once broken, stays broken. Different n: different images (the ladder leaves out those a model "
         "misclassifies unchanged, which [eval] filter = 'none' keeps in the grid)."],
        absent="no grid cell of the runs has a ladder's model, change and a count among its points")


def _curves(runs: list[Run], frame: pd.DataFrame) -> pd.DataFrame:
    """The survival curves (target "wrong"), labelled ``who``: the model, and the ladder where there are several."""
    curves = survival_curves(frame, "wrong")
    if curves.empty:
        return curves
    labels = [_label(runs, r, m) for r, m in zip(curves["run"], curves["model"], strict=True)]
    ladders = curves["ladder_id"] + " to " + curves["max_count"].astype("int64").astype(str)
    if "kind" in curves:
        worst = curves["kind"] == "worst_case"
        ladders = ladders.where(~worst, "worst case (" + curves["attack"].astype(str) + ")")
    several = ladders.nunique() > 1
    return curves.assign(who=[f"{a}, {b}" if several else a for a, b in zip(labels, ladders, strict=True)])


def failure_section(runs: list[Run]) -> Section | None:
    """The section, or None when no run holds failure.parquet (older runs: nothing else changes)."""
    if all(r.failure is None for r in runs):
        return None
    frame = failure_frame(runs)
    tables = [median_table(runs, frame), worst_table(runs, frame), restore_table(runs, frame), agreement_table(runs)]
    plot = plot_survival(_curves(runs, frame)) if len(frame) else None
    return Section("pixels-to-failure", "Pixels to failure", SECTION_TEXT, tables, [plot] if plot else [])
