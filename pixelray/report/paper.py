"""The paper's printed figures (``pixelray/paper_tables.csv``) and when a result of ours matches one.

A printed cell stands beside ours only where the settings are the paper's: the
same model (the torchvision names of the ``paper`` preset with ``weights = "imagenet"``,
or a checkpoint fine-tuned from one), count, amplitude, area, number of evaluated
images and 224 x 224 images. The paper's model names map as in
:data:`PAPER_MODELS`; Tables 7, 8 and 9 name no model, so their figures are shown
as the paper's own rows and never paired with one of our models.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["PAPER_IMAGE_SIZE", "PAPER_MODELS", "PaperCell", "citation", "header_notes", "paper_cells", "paper_name"]

#: torchvision name -> the paper's name (the ``paper`` preset of pixelray.models).
PAPER_MODELS = {
    "resnet101": "ResNet",
    "densenet121": "DenseNet",
    "vgg16": "VGG",
    "alexnet": "AlexNet",
    "squeezenet1_1": "SqueezeNet",
}
#: The weights of the paper's time: torchvision's IMAGENET1K_V1 (``weights = "imagenet"``). ``"default"``
#: follows torchvision, whose DEFAULT is V2 for ResNet101: another model than the paper's.
PRETRAINED = ("imagenet",)
PAPER_IMAGE_SIZE = 224
#: Tables 10 and 11 name the fine-tuned models after the full architecture.
_FINE_TUNED_NAMES = {"resnet101": "ResNet101"}
_RESOURCE = "paper_tables.csv"


@dataclass(frozen=True)
class PaperCell:
    """One printed cell: ``wrong`` of ``n_images`` misclassified (as printed), or a printed Pixel-index."""

    table: int
    model: str
    count: int
    amplitude: str
    area: int
    n_images: int
    wrong: int
    train_aug_count: int | None = None
    attack: str | None = None
    printed_rate: float | None = None  # %, "Recognition rate" as printed
    printed_pi: float | None = None
    note: str = ""


def _text() -> str:
    return resources.files("pixelray").joinpath(_RESOURCE).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def paper_cells() -> tuple[PaperCell, ...]:
    """Every printed cell of the reference file."""
    lines = [line for line in io.StringIO(_text()) if not line.startswith("#")]
    out = []
    for row in csv.DictReader(lines):
        num = {key: float(row[key]) if row[key] else None for key in ("printed_rate", "printed_pi")}
        out.append(PaperCell(
            table=int(row["table"]), model=row["model"], count=int(row["count"]), amplitude=row["amplitude"],
            area=int(row["area"]), n_images=int(row["n_images"]), wrong=int(row["wrong"]),
            train_aug_count=int(row["train_aug_count"]) if row["train_aug_count"] else None,
            attack=row["attack"] or None, printed_rate=num["printed_rate"], printed_pi=num["printed_pi"],
            note=row["note"],
        ))
    return tuple(out)


@lru_cache(maxsize=1)
def header_notes() -> tuple[str, ...]:
    """The reference file's comment header (citation, column meanings, the paper's known misprints)."""
    return tuple(line[1:].strip() for line in io.StringIO(_text()) if line.startswith("#"))


def citation() -> str:
    return ("Zhang, Y. and Cai, Z. (2021) Robustness Augmentation of Deep Learning Model Based on Pixel Change. "
            "Journal of Software Engineering and Applications, 14, 110-132. doi:10.4236/jsea.2021.144008")


def paper_name(base: str, weights: str | None, augment_count: int | None = None, *, table: int = 6) -> str | None:
    """The paper's name for a model of ours, or None when the paper has no such model.

    Args:
        base: the architecture (a torchvision name, or a checkpoint's base).
        weights: the run's weights label; a base model must have the paper's (``imagenet``).
        augment_count: for a checkpoint fine-tuned with n-pixel-change augmentation, n.
        table: Tables 10 and 11 call the base architecture ``ResNet101``, the others ``ResNet``.
    """
    if augment_count is not None or table in (10, 11):
        return _FINE_TUNED_NAMES.get(base) if (augment_count is not None or weights in PRETRAINED) else None
    return PAPER_MODELS.get(base) if weights in PRETRAINED else None


def lookup(table: int, model: str | None, **settings) -> list[PaperCell]:
    """The printed cells of ``table`` for ``model`` (None: the model is not named) matching ``settings``.

    ``settings`` may give ``count``, ``amplitude``, ``area``, ``n_images`` and ``train_aug_count``; a
    setting left out is not compared.
    """
    name = model if model is not None else "unnamed"
    out = []
    for cell in paper_cells():
        if cell.table != table or cell.model != name:
            continue
        if all(getattr(cell, key) == value for key, value in settings.items()):
            out.append(cell)
    return out
