"""The paper's tables from a sweep's results: every cell a count, a rate and its 95% Wilson interval.

Each table is a tidy frame with one entry per (row, column) (``entries.py``): ours, the
paper's figure where the settings match, their difference and whether the paper's figure
lies inside our interval. Rendering (``render.py``) lays the frame out in the paper's grid;
a cell the run does not hold has no entry, so it shows as absent, never as zero. Rows are
found by their settings, not by experiment names: Table 6 is every plain cell with full-range
values over the whole image, whichever experiment of the config measured it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from pixelray.core.metrics import pixel_index, pixel_index_interval
from pixelray.core.worst import budget_text, eps_k
from pixelray.report.entries import Entries, Table, count_col, eps_label, finish_table
from pixelray.report.load import Run
from pixelray.report.paper import PAPER_IMAGE_SIZE, lookup, paper_name

__all__ = ["PAPER_ROW", "Table", "build_tables", "prepare_cells"]

#: Row label of the paper's own figures in Tables 7, 8 and 9, which name no model.
PAPER_ROW = "Zhang & Cai 2021 (model not named)"
_KEYS = ["run", "model", "weights", "attack", "eps", "count", "amplitude", "area", "channels", "positions", "seed"]
_VARIANTS = ("weights", "channels", "positions", "seed")


def _variant(df: pd.DataFrame) -> pd.Series:
    """The row label: the model's label, plus the settings that differ between its rows (seed, channels, ...)."""
    out = df["label"].astype(str)
    for col in _VARIANTS:
        varies = df.groupby("label", sort=False)[col].transform(lambda s: s.astype(str).nunique() > 1)
        out = out.where(~varies, out + f" {col}=" + df[col].astype(str))
    return out


def prepare_cells(runs: list[Run]) -> pd.DataFrame:
    """Every run's cells in one frame, one row per measurement, with display and model columns added."""
    frames = []
    for run in runs:
        df = run.cells.copy()
        df["run"] = run.name
        info = df["model"].map(run.models)
        df["label"] = [i.label for i in info]
        df["base"] = [i.base for i in info]
        df["augment_count"] = pd.array([i.augment_count for i in info], dtype="Int64")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df = df.drop_duplicates(subset=_KEYS).reset_index(drop=True)  # a cell two experiments share: one measurement
    df["whole"] = df["area"].isna() | (df["area"] == df["image_size"])
    df["who"] = _variant(df)
    df["who_order"] = pd.factorize(df["who"])[0]
    df["eps_k"] = [math.nan if pd.isna(e) else eps_k(e, a) for e, a in zip(df["eps"], df["attack"], strict=True)]
    return df


def _row_n(group: pd.DataFrame) -> int | None:
    """The number of evaluated images of a row, when all its cells share one."""
    ns = group["n_images"].unique()
    return int(ns[0]) if len(ns) == 1 else None


def _paper_model(group: pd.DataFrame, table: int) -> str | None:
    """The paper's name for a row's model when its setting is the paper's (image size too), else None."""
    first = group.iloc[0]
    if int(first["image_size"]) != PAPER_IMAGE_SIZE:
        return None
    aug = first["augment_count"]
    return paper_name(first["base"], first["weights"], None if pd.isna(aug) else int(aug), table=table)


def _area_arg(row) -> int | None:
    return None if pd.isna(row.area) else int(row.area)


def _groups(df: pd.DataFrame, by: str | list[str]) -> Iterable[tuple[Any, pd.DataFrame]]:
    return df.groupby(by, sort=False, dropna=False) if len(df) else []


def _plain(c: pd.DataFrame) -> pd.DataFrame:
    return c[c["attack"].isna()]


_CELL = "Cell: misclassified of evaluated · wrong rate [95% Wilson interval]."


def table_6(c: pd.DataFrame) -> Table:
    df = _plain(c)
    df = df[(df["amplitude"] == "full") & df["whole"]]
    e = Entries()
    for who, g in _groups(df, "who"):
        for r in g.sort_values("count").itertuples():
            e.ours((who,), count_col(r.count), r.count, r.n_wrong, r.n_images)
        name, n = _paper_model(g, 6), _row_n(g)
        for cell in lookup(6, name, amplitude="full", area=224, n_images=n) if name and n else []:
            e.paper((who,), count_col(cell.count), cell.count, cell)
    return finish_table("table-6", "Table 6: misclassified images per model and number of changed pixels",
                   "Each changed value replaced by a uniform random value in [0, 255], anywhere in the image. " + _CELL,
                   ("model",), e, absent="the runs hold no cell with full-range changes over the whole image")


def table_5(c: pd.DataFrame, runs: list[Run]) -> Table:
    df = _plain(c)
    df = df[(df["amplitude"] == "full") & df["whole"]]
    clean = {(r.name, m): v for r in runs if r.clean is not None
             for m, v in r.clean.set_index("model")[["n_images", "n_correct"]].iterrows()}
    e = Entries()
    for who, g in _groups(df, "who"):
        name = _paper_model(g, 5)
        for r in g.sort_values("count").itertuples():
            k, n, area, size = int(r.n_wrong), int(r.n_images), _area_arg(r), int(r.image_size)
            col = f"Pi, {count_col(r.count)}"
            if n >= 1:
                low, high = pixel_index_interval(k, n, r.count, r.amplitude, area, size)
                e.pi((who,), col, r.count, pixel_index(k, n, r.count, r.amplitude, area, size), low, high, k, n)
            for cell in lookup(5, name, count=r.count, amplitude="full", area=224, n_images=n) if name else []:
                e.paper((who,), col, r.count, cell, pi=True)
        first = g.iloc[0]
        acc = clean.get((first["run"], first["model"]))
        if acc is not None:
            e.ours((who,), "clean accuracy", math.inf, int(acc["n_correct"]), int(acc["n_images"]))
    notes = ["Pi = w / (p × r × a) with w the misclassified fraction, p = n / (H × W), r the amplitude range / 255 "
             "and a the area's share of the image; its interval is the Wilson interval on w, scaled. The "
             "misclassified counts are Table 6's.",
             "Clean accuracy: every image of the data set, before any change (clean.parquet). The paper's Table 5 "
             "'Recognition rate' column belongs to other models (copied from its Table 1) and is not compared."]
    return finish_table("table-5", "Table 5: Pixel-index per model",
                   "Full-range changes anywhere in the image; the paper prints Pi at n = 64. "
                   "Pi cell: Pi [95% interval]; clean accuracy: correct of predicted · rate [95% Wilson interval].",
                   ("model",), e, notes, absent="the runs hold no cell with full-range changes over the whole image")


def _unnamed_rows(e: Entries, table: int, keys, label_of, settings_of, n_paper: set[int]) -> None:
    """The paper's own rows of a table that names no model, for the settings (``keys``) our rows hold."""
    for key in keys:
        for n in sorted(n_paper):
            for cell in lookup(table, None, n_images=n, **settings_of(key)):
                e.paper((PAPER_ROW, label_of(key)), count_col(cell.count), cell.count, cell)


def _eligible_ns(df: pd.DataFrame, table: int) -> set[int]:
    """Evaluated-set sizes of the rows whose model and images are the paper's (for tables naming no model)."""
    out = set()
    for _, g in _groups(df, "who"):
        if _paper_model(g, table) is not None and _row_n(g) is not None:
            out.add(_row_n(g))
    return out


def table_7(c: pd.DataFrame) -> Table:
    df = _plain(c)
    df = df[(df["amplitude"] != "full") & df["whole"]].copy()
    df["a"] = df["amplitude"].astype(int)
    e = Entries()
    label = lambda a: f"±{a}"  # noqa: E731
    for (who, a), g in _groups(df.sort_values(["who_order", "a"], kind="stable"), ["who", "a"]):
        for r in g.sort_values("count").itertuples():
            e.ours((who, label(a)), count_col(r.count), r.count, r.n_wrong, r.n_images)
    ns = _eligible_ns(df, 7)
    amps = sorted(set(df["a"]))
    _unnamed_rows(e, 7, amps, label, lambda a: {"amplitude": str(a), "area": 224}, ns)
    return finish_table("table-7", "Table 7: misclassified images per shift amplitude and number of changed pixels",
                   "Each changed value shifted by a uniform random integer in [-a, +a], clipped to [0, 255], "
                   "anywhere in the image. " + _CELL, ("model", "amplitude a"), e,
                   ["The paper does not name the model of Table 7; its figures stand in their own rows."],
                   absent="the runs hold no cell with a bounded shift amplitude")


def table_8(c: pd.DataFrame) -> Table:
    df = _plain(c)
    df = df[df["amplitude"] == "full"]
    if not (~df["whole"]).any():
        df = df.iloc[0:0]  # no area restriction: nothing beyond Table 6
    df = df.assign(side=df["area"].fillna(df["image_size"]).astype(int))
    e = Entries()
    label = lambda s: f"{s} × {s}"  # noqa: E731
    df = df.sort_values(["who_order", "side"], ascending=[True, False], kind="stable")
    for (who, side), g in _groups(df, ["who", "side"]):
        for r in g.sort_values("count").itertuples():
            e.ours((who, label(side)), count_col(r.count), r.count, r.n_wrong, r.n_images)
    ns = _eligible_ns(df, 8)
    sides = sorted(set(df["side"]), reverse=True)
    _unnamed_rows(e, 8, sides, label, lambda s: {"amplitude": "full", "area": s}, ns)
    return finish_table("table-8", "Table 8: misclassified images per area and number of changed pixels",
                   "Changed positions inside the centred s × s square (px); values replaced by a uniform random "
                   "value in [0, 255]. " + _CELL, ("model", "area (px)"), e,
                   ["The paper does not name the model of Table 8; its figures stand in their own rows."],
                   absent="the runs hold no cell restricted to a centred area")


def table_9(c: pd.DataFrame) -> Table:
    df = c[c["attack"].notna() & (c["amplitude"] == "full") & c["whole"]]
    e = Entries()
    for (who, eps, attack), g in _groups(df.sort_values(["who_order", "eps"], kind="stable"), ["who", "eps", "attack"]):
        for r in g.sort_values("count").itertuples():
            col = count_col(r.count)
            e.ours((who, eps_label(eps, attack), "still misclassified"), col, r.count, r.n_wrong, r.n_images)
            e.ours((who, eps_label(eps, attack), "restored"), col, r.count, r.n_restored, r.n_images)
    ns = _eligible_ns(df, 9)
    for n in sorted(ns):
        for cell in lookup(9, None, amplitude="full", area=224, n_images=n):
            col = count_col(cell.count)
            e.paper((PAPER_ROW, "FGSM, ε not printed", "still misclassified"), col, cell.count, cell)
            e.paper((PAPER_ROW, "FGSM, ε not printed", "restored"), col, cell.count, cell, k=n - cell.wrong)
    return finish_table("table-9", "Table 9: FGSM adversarial examples under pixel changes",
                   "The kept adversarial examples of each model and ε (with keep = 'successful': those that fool the "
                   "model after rounding to uint8), "
                   "then n changed pixels (full range, whole image): still misclassified, and restored to the true "
                   "class. Cell: examples of kept · rate [95% Wilson interval].",
                   ("model", "attack", "examples"), e,
                   ["The paper neither names the model of Table 9 nor prints its ε; its figures stand in their own "
                    "rows."],
                   absent="the runs hold no attack (no [attack] section in their configs)")


def fgsm_success(runs: list[Run]) -> Table:
    e = Entries()
    for run in runs:
        if run.attack is None:
            continue
        for r in run.attack.sort_values("eps", kind="stable").itertuples():
            k = eps_k(r.eps, r.attack)
            label = run.models[r.model].label if r.model in run.models else r.model
            e.ours((label, r.attack.upper()), budget_text(r.eps, r.attack), k, r.n_success, r.n_attacked)
    return finish_table("fgsm-success", "Attack success rate before any pixel change",
                   "Candidates each attack (FGSM, PGD, ...) made misclassified after rounding to uint8 "
                   "(attack.parquet). Cell: successful of attacked · success rate [95% Wilson interval].",
                   ("model", "attack"), e, absent="the runs hold no attack (no attack.parquet)")


def table_10(c: pd.DataFrame) -> Table:
    df = _plain(c)
    df = df[(df["amplitude"] == "full") & df["whole"] & df["augment_count"].notna()]
    e = Entries()
    for who, g in _groups(df.sort_values(["augment_count", "who_order"], kind="stable"), "who"):
        aug = int(g["augment_count"].iloc[0])
        row = (who, f"{aug} pixels")
        for r in g.sort_values("count").itertuples():
            e.ours(row, count_col(r.count), r.count, r.n_wrong, r.n_images)
        name, n = _paper_model(g, 10), _row_n(g)
        for cell in lookup(10, name, train_aug_count=aug, amplitude="full", area=224, n_images=n) if name and n else []:
            e.paper(row, count_col(cell.count), cell.count, cell)
    return finish_table("table-10", "Table 10: models trained with pixel-change augmentation",
                   "Checkpoints whose sidecar names an n-pixel-change augmentation (row: that n), then n changed "
                   "pixels at test time (full range, whole image). " + _CELL, ("model", "trained with"), e,
                   absent="the runs hold no checkpoint trained with pixel-change augmentation (made by "
                          "`pixelray train-augment`; its sidecar's metadata names augment_count or augment.count)")


def table_11(runs: list[Run]) -> Table:
    e = Entries()
    for run in runs:
        if run.transfer is None:
            continue
        size = int(run.cells["image_size"].iloc[0]) if len(run.cells) else 0
        weights = run.cells["weights"].iloc[0] if len(run.cells) else None
        for r in run.transfer.sort_values("eps", kind="stable").itertuples():
            src, tgt = run.models.get(r.source_model), run.models.get(r.target_model)
            if src is None or tgt is None or src.derived:  # the examples of base models only
                continue
            if r.source_model == r.target_model:
                aug, label = None, f"{src.label} (attacked)"
            elif tgt.fine_tuned and tgt.fine_tuned_from(src):
                aug, label = tgt.augment_count, tgt.label
            else:
                continue
            row = (eps_label(r.eps, r.attack), label)
            e.ours(row, "misclassified", 0, r.n_fooled, r.n_images)
            e.ours(row, "recognised", 1, r.n_correct, r.n_images)
            name = paper_name(src.base, weights, aug, table=11) if size == PAPER_IMAGE_SIZE else None
            for cell in lookup(11, name, train_aug_count=aug, n_images=r.n_images) if name else []:
                e.paper(row, "misclassified", 0, cell)
                e.paper(row, "recognised", 1, cell, k=cell.n_images - cell.wrong)
    table = finish_table("table-11", "Table 11: FGSM examples of a base model judged by its augmented versions",
                    "Examples made on the attacked (base) model and kept there, judged unchanged by the models "
                    "trained with pixel-change augmentation on the same architecture (transfer.parquet). "
                    "Cell: examples of kept · rate [95% Wilson interval].", ("attack", "judged by"), e,
                    ["The paper does not print Table 11's ε: its figures stand beside every ε."],
                    absent="the runs hold no attack judged by a model trained with pixel-change augmentation")
    return table


def transfer_matrix(runs: list[Run]) -> Table:
    e = Entries()
    for run in runs:
        if run.transfer is None:
            continue
        labels = {m: info.label for m, info in run.models.items()}
        for r in run.transfer.sort_values("eps", kind="stable").itertuples():
            order = list(run.models).index(r.target_model) if r.target_model in run.models else math.inf
            row = (eps_label(r.eps, r.attack), labels.get(r.source_model, r.source_model))
            e.ours(row, labels.get(r.target_model, r.target_model), order,
                   r.n_fooled, r.n_images)
    return finish_table("transfer", "FGSM transfer matrix",
                   "Rows: the model the examples were made on (its kept examples); columns: the model judging them. "
                   "Cell: fooled of kept · fooled rate [95% Wilson interval]. The diagonal is the attacked "
                   "model's own verdict.", ("attack", "made on"), e,
                   absent="the runs hold no attack (no transfer.parquet)")


def corruptions(runs: list[Run]) -> Table:
    """Beyond the paper: standard corruptions (ImageNet-C impulse noise) and the pixel count doing as much damage."""
    e = Entries()
    for run in runs:
        df = run.corruptions
        if df is None or df.empty:
            continue
        for r in df[df["attack"].isna()].sort_values(["family", "severity"], kind="stable").itertuples():
            label = run.models[r.model].label if r.model in run.models else r.model
            col = f"severity {int(r.severity)}"
            e.ours((label, r.family, "misclassified"), col, r.severity, r.n_wrong, r.n_images)
            if not pd.isna(r.equivalent_pixels):
                low, high = (None if pd.isna(v) else v for v in (r.equivalent_pixels_low, r.equivalent_pixels_high))
                e.pixels((label, r.family, "equivalent pixels"), col, r.severity, r.equivalent_pixels, low, high)
    return finish_table("corruptions", "Corruptions: impulse noise beside the paper's pixel changes",
                   "ImageNet-C's impulse noise (salt and pepper over every channel value) at each severity: "
                   "misclassified images, and the number of changed pixels (full range, whole image) with the same "
                   "wrong rate, interpolated on the count axis with the interval carried ('<' and '>': beyond the "
                   "counts the run measured).",
                   ("model", "family", "measure"), e, absent="the runs hold no corruption experiment")


def build_tables(runs: list[Run]) -> list[Table]:
    """Every table of the report, in the paper's order, then what goes beyond the paper."""
    c = prepare_cells(runs)
    return [table_5(c, runs), table_6(c), table_7(c), table_8(c), table_9(c), fgsm_success(runs), table_10(c),
            table_11(runs), transfer_matrix(runs), corruptions(runs)]
