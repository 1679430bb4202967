"""Adversarial attacks on a batch of images, and the registry a sweep picks them from.

Each attack is a file here: a pure function on a batch (``fgsm``, ``pgd``) and an
:class:`~pixelray.attacks.base.AttackSpec` that says its name, its parameters and how
a sweep runs it. ``[attack] kind`` names a built-in spec or ``module.path:SPEC``, an
``AttackSpec`` of the user's own (imported, like a ``module.path:factory`` model, only
because the user's config names it). Workers and the driver know only the spec.
"""

from __future__ import annotations

import importlib
import re

from pixelray.attacks.base import (
    AttackOutcome,
    AttackSpec,
    Param,
    PassCost,
    check_labels,
    eval_mode,
    predict,
    to_uint8,
    to_unit,
)
from pixelray.attacks.fgsm import FGSM, FGSMOutcome, fgsm, fgsm_float, fgsm_with_success
from pixelray.attacks.pgd import PGD, pgd, pgd_float
from pixelray.attacks.sparse import SPARSE, sparse, sparse_search

__all__ = [
    "BUILTIN",
    "AttackOutcome",
    "AttackSpec",
    "FGSMOutcome",
    "Param",
    "PassCost",
    "check_labels",
    "eval_mode",
    "fgsm",
    "fgsm_float",
    "fgsm_with_success",
    "get_attack",
    "pgd",
    "pgd_float",
    "predict",
    "sparse",
    "sparse_search",
    "to_uint8",
    "to_unit",
]

#: The attacks that come with pixelray, by ``[attack] kind``.
BUILTIN: dict[str, AttackSpec] = {spec.name: spec for spec in (FGSM, PGD, SPARSE)}

_PLUGIN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def get_attack(kind: str) -> AttackSpec:
    """The spec of a built-in attack, or of ``module.path:SPEC`` (imported); ValueError naming the choices."""
    if kind in BUILTIN:
        return BUILTIN[kind]
    allowed = f"allowed: {sorted(BUILTIN)} or 'module.path:SPEC' naming an AttackSpec of your own"
    if not isinstance(kind, str) or not _PLUGIN_RE.match(kind):
        raise ValueError(f"kind = {kind!r}: unknown attack; {allowed}")
    module_name, attr = kind.split(":", 1)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"kind = {kind!r}: cannot import {module_name!r} ({exc}); check the module path and "
                         "that it is importable on every worker") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, AttackSpec):
        raise ValueError(f"kind = {kind!r}: {attr!r} in {module_name!r} is not an AttackSpec; {allowed}")
    return obj
