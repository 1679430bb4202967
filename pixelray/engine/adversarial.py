"""The compute of attack units: adversarial examples at every eps, every cell over them, every judge.

An attack unit makes adversarial examples (the config's attack, through the interface of
:mod:`pixelray.attacks`) with the unit's model at every eps, runs every cell over them, and
has every model of the sweep judge them (the transfer matrix). It returns per-image bits, not
counts, so that the driver can pick the kept examples exactly across shards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelray.attacks import PassCost, get_attack
from pixelray.core.ladder import Ladder
from pixelray.core.spec import Cell
from pixelray.engine.evaluate import correct_under_cells, predict
from pixelray.engine.ladder import LADDER_FIELDS, ladder_outcomes
from pixelray.engine.units import model_slug

__all__ = ["AttackPlan", "attack_images", "attack_outcomes", "save_examples"]


@dataclass(frozen=True)
class AttackPlan:
    """What an attack unit does: the attack, its steps, which examples go on, and who judges them.

    Args:
        eps: radii in pixel units k (eps is k/255).
        keep_all: run the cells and judges over every example (``keep = "all"``), not only
            over those that fool the model after rounding.
        judges: the sweep's models, in order; each judges every example (transfer).
        save_dir: write the examples that go through the cells as shards here (optional).
        kind: the attack (``[attack] kind``: a built-in name or ``module.path:SPEC``).
        params: its parameters, ``(key, value)`` pairs as the config checked them.
        report_float: also judge the unrounded examples (``[attack] report_float``).
        ladders: the sweep's ladders: the pixels that restore each example that may be kept.
        size: ``[attack] size``: the kept examples are the ``size`` lowest ids of all units together, so a
            unit's ladders search only its ``size`` lowest-id eligible examples per eps (None: all).
    """

    eps: tuple[int, ...]
    keep_all: bool
    judges: tuple[str, ...]
    save_dir: str | None = None
    kind: str = "fgsm"
    params: tuple[tuple[str, Any], ...] = ()
    report_float: bool = False
    ladders: tuple[Ladder, ...] = ()  # pixels to restore: each ladder over the examples that may be kept
    size: int | None = None  # [attack] size: at most this many examples per eps can be kept from one unit


@contextlib.contextmanager
def _exact_fp32(device: torch.device):
    """cuDNN without TF32 for the attack: with TF32 a few gradient signs change from run to run
    (see ``pixelray.attacks``); without it the examples repeat exactly."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def attack_outcomes(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    eps: Sequence[int],
    cells: Sequence[Cell],
    judges: Sequence[torch.nn.Module | None],
    batch_size: int,
    *,
    keep_all: bool = False,
    amp: bool = False,
    on_examples: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    attack: str = "fgsm",
    params: Sequence[tuple[str, Any]] = (),
    report_float: bool = True,
    cell_options: dict | None = None,
    ladders: Sequence[Ladder] = (),
    size: int | None = None,
) -> dict[str, np.ndarray | None]:
    """The attack with ``model`` at each eps, then every cell and every judge over the examples; per-image bits.

    The attack (``attack``, a kind for :func:`pixelray.attacks.get_attack`, with its
    ``params``) runs in fp32 (on CUDA without TF32) in slices of ``batch_size``; ``amp``
    applies to the cells and judges only. The cells and the judges see the uint8
    examples, and only the *eligible* ones: those the model misclassifies after
    rounding, or all with ``keep_all``. On CPU the bits of an image do not depend on
    the batch size for the tiny CNN; big torchvision models can differ in a few
    near-zero gradient signs across batch sizes (oneDNN, see ``pixelray.attacks``).

    Host syncs: the labels' range is checked once, before the attack; the attack runs at
    every eps with its verdicts kept as masks on the device; then one copy of the (eps,
    images) mask tells which examples go on (running the cells over examples that cannot
    be kept would cost more than this one wait); the bits come back at the end.

    Args:
        model: the attacked classifier (uint8 or [0, 1] input, normalisation inside).
        images: uint8 (N, H, W, 3) or (N, 3, H, W), on the model's device.
        labels, image_ids: int64 (N,), on the same device.
        eps: steps in pixel units k (k/255).
        cells: the pixel changes applied to the examples.
        judges: models that judge the unchanged examples; ``None`` stands for ``model``
            itself, whose verdict is the attack's own (``not success``).
        on_examples: called as ``on_examples(eps_index, image_ids, labels, examples)`` with
            the eligible uint8 examples of each eps (to save them).
        report_float: also judge the unrounded examples (``success_float``); without it
            ``success_float`` is None and, for attacks that allow it, a forward pass is saved.
        cell_options: options of :func:`correct_under_cells` (a worker's perturber, ...).
        ladders: pixels to restore: :func:`~pixelray.engine.ladder.ladder_outcomes` with ``target = "right"``
            over the examples that go on (an example the model already classifies correctly: 0), the ``size``
            lowest ids of them per eps (the most the driver can keep from one unit; None: all).

    Memory: the examples of every eps are kept until the cells run (E x the unit's images).

    Returns:
        ``success_float`` and ``success`` bool (E, N): the model misclassifies the
        unrounded / the uint8 example (``success_float`` None without ``report_float``);
        ``restored`` bool (E, C, N): under each cell the model predicts the true label;
        ``correct_by`` bool (E, J, N): each judge predicts the true label on the example.
        ``restored`` and ``correct_by`` are False for images that are not eligible. With ``ladders``, each
        of :data:`~pixelray.engine.ladder.LADDER_FIELDS` int64 (E, L, N), -1 for images that are not eligible.
    """
    from pixelray.attacks import check_labels

    check_labels(labels, getattr(model, "num_classes", None))  # once per unit, not per batch
    unit = _Unit(model, images, labels, image_ids, batch_size)
    found = _attack_every_eps(unit, eps, attack, params, report_float)
    restored, correct_by, restore = _cells_and_judges(unit, found, cells, judges, keep_all=keep_all, amp=amp,
                                                      on_examples=on_examples, cell_options=cell_options,
                                                      ladders=ladders, size=size)
    return {
        "success_float": None if found.success_float is None else found.success_float.cpu().numpy(),
        "success": found.success.cpu().numpy(),
        "restored": restored.cpu().numpy(),
        "correct_by": correct_by.cpu().numpy(),
        **restore,
        **({} if found.queries is None else {"queries": found.queries.cpu().numpy()}),
    }


def attack_images(bits: dict[str, np.ndarray | None], cost: PassCost, keep_all: bool, cells: int,
                  judges: int) -> tuple[int, int]:
    """(images forwarded, images through forward and backward) by an attack unit, from its outcome.

    The attack's own passes (``cost`` per image and eps: its verdicts, its gradient steps; a search that
    stops sooner says in ``queries`` how many it took), then over the eligible examples every cell, every
    other model's verdict (``judges``: the attacked model's is the attack's own) and the restore ladders
    (``n_passes``, -1 where not searched).
    """
    success = bits["success"]
    eligible = success.size if keep_all else int(success.sum())
    queries = bits.get("queries")
    forward = int(queries.sum()) if cost.bound and queries is not None else success.size * cost.forward
    forward += eligible * (cells + judges)
    if bits.get("n_passes") is not None:
        forward += int(np.maximum(bits["n_passes"], 0).sum())
    return forward, success.size * cost.grad


@dataclass(frozen=True)
class _Unit:
    """An attack unit's model and images (labels, ids), all on the model's device, and its batch size."""

    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    batch_size: int


@dataclass(frozen=True)
class _Examples:
    """The attack's examples at every eps (E, N, ...) and its verdicts (E, N), on the device."""

    adv: torch.Tensor
    success: torch.Tensor
    success_float: torch.Tensor | None
    queries: torch.Tensor | None = None  # (E, N): the forward passes a search spent per image


def _attack_every_eps(unit: _Unit, eps: Sequence[int], attack: str, params: Sequence[tuple[str, Any]],
                      report_float: bool) -> _Examples:
    """The attack at each eps, in slices of the batch size, in fp32 (on CUDA without TF32); no host sync."""
    images, n, dev = unit.images, unit.images.shape[0], unit.images.device
    success_float = torch.zeros(len(eps), n, dtype=torch.bool, device=dev) if report_float else None
    success = torch.zeros(len(eps), n, dtype=torch.bool, device=dev)
    examples = torch.empty((len(eps), *images.shape), dtype=images.dtype, device=dev)
    queries = None
    spec = get_attack(attack)
    kwargs = dict(params)
    if spec.optional_float:
        kwargs["report_float"] = report_float
    for e, k in enumerate(eps):
        for start in range(0, n, unit.batch_size):
            stop = min(start + unit.batch_size, n)
            with _exact_fp32(dev) if spec.needs_grad else contextlib.nullcontext():
                outcome = spec.run(unit.model, images[start:stop], unit.labels[start:stop],
                                   unit.image_ids[start:stop], spec.budget(k), **kwargs)
            examples[e, start:stop] = outcome.adv
            success[e, start:stop] = outcome.success
            if success_float is not None:
                success_float[e, start:stop] = outcome.success_float
            if outcome.queries is not None:
                if queries is None:
                    queries = torch.zeros(len(eps), n, dtype=torch.int64, device=dev)
                queries[e, start:stop] = outcome.queries
    return _Examples(examples, success, success_float, queries)


def _eligible(success: torch.Tensor, keep_all: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(eps index, the examples that go on) for each eps that has any: every one with ``keep_all``, else
    those that fool the model after rounding (one copy of the mask to the host tells which)."""
    n_eps, n = success.shape
    eligible = None if keep_all else success.cpu().numpy()  # the one wait: which examples go on
    for e in range(n_eps):
        if keep_all:
            yield e, torch.arange(n, device=success.device)
            continue
        index = np.flatnonzero(eligible[e])
        if len(index):
            yield e, torch.from_numpy(index).to(success.device)


def _cells_and_judges(
    unit: _Unit,
    found: _Examples,
    cells: Sequence[Cell],
    judges: Sequence[torch.nn.Module | None],
    *,
    keep_all: bool,
    amp: bool,
    on_examples: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None,
    cell_options: dict | None,
    ladders: Sequence[Ladder] = (),
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """``restored`` (E, C, N) and ``correct_by`` (E, J, N): every cell and every judge over the eligible examples;
    and with ``ladders`` the pixels to restore them (each field (E, L, N), -1 where not eligible)."""
    n_eps, n = found.success.shape
    restore = {name: np.full((n_eps, len(ladders), n), -1, dtype=np.int64) for name in LADDER_FIELDS} if ladders \
        else {}
    dev = found.success.device
    restored = torch.zeros(n_eps, len(cells), n, dtype=torch.bool, device=dev)
    correct_by = torch.zeros(n_eps, len(judges), n, dtype=torch.bool, device=dev)
    options = dict(cell_options or {})
    for e, chosen in _eligible(found.success, keep_all):
        adv, truth, ids = found.adv[e][chosen], unit.labels[chosen], unit.image_ids[chosen]
        if on_examples is not None:
            on_examples(e, ids, truth, adv)
        restored[e][:, chosen] = correct_under_cells(unit.model, adv, truth, ids, cells, unit.batch_size, amp,
                                                     **options)
        for j, judge in enumerate(judges):
            verdict = (~found.success[e, chosen] if judge is None
                       else predict(judge, adv, unit.batch_size, amp) == truth)
            correct_by[e, j, chosen] = verdict
        if ladders:  # the examples that may be kept: the unit's `size` lowest ids (the driver keeps the lowest)
            first = torch.argsort(ids, stable=True)[:size] if size is not None else torch.arange(len(ids))
            first = first.to(chosen.device)
            at_zero = (~found.success[e, chosen[first]]).cpu().numpy()  # keep = "all": already correct
            found_k = ladder_outcomes(unit.model, adv[first], truth[first], ids[first], ladders, unit.batch_size,
                                      amp, target="right", flipped_at_zero=at_zero)
            index = chosen[first].cpu().numpy()
            for name in LADDER_FIELDS:
                restore[name][e][:, index] = found_k[name]
    return restored, correct_by, restore


def save_examples(
    root: str, model: str, k: int, shard_name: str, ids: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
    num_classes: int, source: str = "fgsm",
) -> dict:
    """Write uint8 NHWC examples as one pixelray shard ``ROOT/<model>/eps<k>/<shard stem>.parquet``, atomically.

    ``ROOT`` is a local directory or any pyarrow filesystem URI (``s3://...``). Returns the
    shard's manifest entry (file relative to ``ROOT/<model>/eps<k>``, rows, sha256, id range);
    the driver writes the manifest over all of them at the end.
    """
    from pixelray.shards import ShardWriter
    from pixelray.store.storage import Location, join_uri

    name = shard_name.rsplit(".", 1)[0] + ".parquet"
    with tempfile.TemporaryDirectory(prefix="pixelray-adv-") as tmp:
        with ShardWriter(
            os.path.join(tmp, "set"), name="adversarial", height=images.shape[1], width=images.shape[2],
            class_names=[str(i) for i in range(num_classes)], source=source, rows_per_shard=max(1, len(ids)),
        ) as writer:
            writer.add(ids.cpu().numpy(), labels.cpu().numpy(), images.cpu().numpy(), [""] * len(ids))
        info = writer.close().shards[0]
        data = Path(tmp, "set", info.file).read_bytes()
    Location(join_uri(root, model_slug(model), f"eps{k}", name)).write_bytes(data)
    return {"file": name, "rows": info.rows, "sha256": info.sha256, "min_id": info.min_id, "max_id": info.max_id}
