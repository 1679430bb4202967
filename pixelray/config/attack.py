"""The ``[attack]`` section of a sweep config (light: the attack's module is imported only to check its parameters)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pixelray.config.tomlcheck import ConfigError, get_value
from pixelray.core.check import is_int

__all__ = ["AttackConfig", "Keep", "parse_attacks"]


class Keep(str, Enum):
    """Which adversarial examples go through the grid."""

    SUCCESSFUL = "successful"  # those the attacked model misclassifies after uint8 rounding (the paper)
    ALL = "all"  # every attacked image, fooled or not


@dataclass(frozen=True)
class AttackConfig:
    """The ``[attack]`` section: which attack, at which steps, on which images.

    The attack runs on the images the ``[eval]`` filter admits (not cut to the eval
    size: the attack has its own ``size``), per model, white-box.

    Args:
        kind: the attack: a built-in name (``fgsm``, ``pgd``) or ``module.path:SPEC``
            (see :mod:`pixelray.attacks`).
        eps: steps in pixel units k, each meaning k/255 in [0, 1] pixel space, e.g. (1, 2, 4, 8).
        keep: ``successful`` keeps the examples the model misclassifies after rounding to
            uint8; ``all`` keeps every example.
        size: keep at most this many examples per (model, eps), lowest image ids first
            (the paper: 10,000 successful examples); None keeps all.
        params: the attack's own parameters (e.g. PGD's ``steps``), as ``(key, value)``
            pairs; every parameter is filled in with its default and checked by the spec.
        report_float: also judge the unrounded examples (``success_float``,
            ``n_success_float`` and ``success_rate_float`` in the tables; null without it).
            It costs one more forward pass per example and eps (about 20% of FGSM).
        ladder: for an attack on pixel counts (``k``), ``ladder = true`` instead of ``k``: worst-case pixels
            to failure (:mod:`pixelray.core.worst`), its ladder's ``steps_per_octave``, ``max_count`` and
            ``search`` as ``(key, value)`` pairs; ``size`` then caps the images per model. None: an attack.
    """

    kind: str = "fgsm"
    eps: tuple[int, ...] = (1, 2, 4, 8)
    keep: Keep = Keep.SUCCESSFUL
    size: int | None = None
    params: tuple[tuple[str, Any], ...] = ()
    report_float: bool = False
    ladder: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        from pixelray.attacks import get_attack  # the attack's own module decides its parameters

        spec = get_attack(self.kind)
        object.__setattr__(self, "params", tuple(sorted(spec.parse(dict(self.params)).items())))
        if self.ladder is not None:
            self._check_ladder(spec)
            return
        try:
            object.__setattr__(self, "keep", Keep(self.keep))
        except ValueError:
            raise ValueError(f"keep = {self.keep!r}: allowed: {[k.value for k in Keep]}") from None
        eps = tuple(self.eps) if isinstance(self.eps, (list, tuple)) else self.eps
        key = self.axis
        if (
            not isinstance(eps, tuple) or not eps
            or not all(is_int(e) for e in eps)
        ):
            shown = list(eps) if isinstance(eps, tuple) else eps
            if key == "k":
                raise ValueError(f"k = {shown!r}: expected a non-empty list of pixel counts, e.g. [1, 4, 16]")
            raise ValueError(
                f"eps = {shown!r}: expected a non-empty list of integers k (pixel units, k/255), e.g. [1, 2, 4, 8]"
            )
        if key == "k":
            if any(e < 1 for e in eps):
                raise ValueError(f"k = {list(eps)!r}: each count must be >= 1 (changed pixel positions)")
        else:
            bad = [e for e in eps if not 1 <= e <= 255]
            if bad:
                raise ValueError(f"eps = {list(eps)!r}: {bad} outside 1..255; eps is in pixel units k meaning k/255, "
                                 "e.g. [1, 2, 4, 8]")
        if len(set(eps)) != len(eps):
            raise ValueError(f"{key} = {list(eps)!r}: each value may appear once")
        object.__setattr__(self, "eps", eps)
        if self.size is not None and (not is_int(self.size) or self.size < 1):
            raise ValueError(f"size = {self.size!r}: must be an integer >= 1, or omit it to keep every example")
        if not isinstance(self.report_float, bool):
            raise ValueError(f"report_float = {self.report_float!r}: must be true or false")

    def _check_ladder(self, spec) -> None:
        if spec.unit != "pixels":
            raise ValueError(f"ladder = true: kind = {self.kind!r} is not an attack on pixel counts; worst-case "
                             "pixels to failure needs one, e.g. kind = 'sparse'")
        if self.eps:
            raise ValueError(f"ladder = true with k = {list(self.eps)}: give one of them (a ladder searches its own "
                             "counts)")
        if self.keep is not Keep.SUCCESSFUL and self.keep != "successful" or self.report_float:
            raise ValueError("ladder = true: keep and report_float do not apply (it keeps no examples); drop them")
        object.__setattr__(self, "keep", Keep.SUCCESSFUL)
        if self.size is not None and (not is_int(self.size) or self.size < 1):
            raise ValueError(f"size = {self.size!r}: must be an integer >= 1 (images per model), or omit it for all")
        self.worst_case()  # the ladder's own checks

    def worst_case(self):
        """The worst-case ladder of ``ladder = true`` (:class:`~pixelray.core.worst.WorstCase`); None otherwise."""
        if self.ladder is None:
            return None
        from pixelray.core.ladder import Ladder
        from pixelray.core.worst import WorstCase

        params, options = dict(self.params), dict(self.ladder)
        if "budget" not in params or "seed" not in params:
            raise ValueError(f"ladder = true: kind = {self.kind!r} has no budget and seed; worst-case pixels to "
                             "failure needs a search with both, e.g. kind = 'sparse'")
        ladder = Ladder(seed=params["seed"], search=options.get("search", "bisect"),
                        steps_per_octave=options.get("steps_per_octave", 4), max_count=options.get("max_count"))
        return WorstCase(ladder, params["budget"], self.name, self.size, params.get("init", "random"))

    def check_image(self, height: int, width: int) -> None:
        """ValueError when ``k`` or a worst-case ladder's points do not fit ``height`` x ``width`` images."""
        if self.ladder is not None:
            self.worst_case().ladder.check_image(height, width)
        elif self.axis == "k" and max(self.eps) > height * width:
            raise ValueError(f"k = {list(self.eps)}: {max(self.eps)} pixels is more than the {height}x{width} images "
                             f"hold; use counts <= {height * width}")

    @property
    def axis(self) -> str:
        """The config key of the attack's steps: ``eps`` (k/255) or, for an attack on pixel counts, ``k``."""
        from pixelray.attacks import get_attack

        return "k" if get_attack(self.kind).unit == "pixels" else "eps"

    def budget(self, k: int) -> float:
        """The rows' ``eps`` for step ``k``: k/255, or k pixels for an attack on pixel counts."""
        from pixelray.attacks import get_attack

        return get_attack(self.kind).budget(k)

    @property
    def name(self) -> str:
        """The attack's name in result rows (a plug-in's spec name, not its module path)."""
        from pixelray.attacks import get_attack

        return get_attack(self.kind).name

    @property
    def params_label(self) -> str:
        """The parameters as canonical JSON (``attack_params`` in the results), ``{}`` for none."""
        return json.dumps(dict(self.params), sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """What determines the attack's results (parameters only when the attack has any, report_float only
        when true: a config without them keeps its hash)."""
        if self.ladder is not None:
            return {"kind": self.kind, "ladder": dict(self.ladder), "size": self.size, "params": dict(self.params)}
        out = {"kind": self.kind, self.axis: list(self.eps), "keep": self.keep.value, "size": self.size}
        if self.params:
            out["params"] = dict(self.params)
        if self.report_float:
            out["report_float"] = True
        return out


def parse_attacks(raw: dict, source: str) -> tuple[AttackConfig, ...]:
    """``[attack]`` (one table) or ``[[attack]]`` (several), each checked; attack names distinct."""
    tables = get_value(raw, "attack", source, (dict, list), [])
    tables = [tables] if isinstance(tables, dict) else tables
    out = []
    for i, table in enumerate(tables):
        where = "attack" if len(tables) == 1 else f"attack #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] expected a table [attack] or [[attack]]")
        out.append(_attack(table, where))
    for group in ([a.name for a in out if a.ladder is None], [a.name for a in out if a.ladder is not None]):
        if len(set(group)) != len(group):  # once as an attack, once as a worst-case ladder (ladder = true)
            raise ConfigError(f"[[attack]] kinds {group}: each attack may appear once per sweep (and once more with "
                              "ladder = true)")
    return tuple(out)


def _attack(table: dict, where: str) -> AttackConfig:
    from pixelray.attacks import get_attack

    kind = get_value(table, "kind", where, str, fix="e.g. kind = 'fgsm'")
    try:
        pixels = get_attack(kind).unit == "pixels"
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None
    ladder = get_value(table, "ladder", where, bool, False, fix="true or false")
    if ladder:
        return _worst_case(table, where, kind)
    axis, other = ("k", "eps") if pixels else ("eps", "k")
    if other in table:
        said = "a number of changed pixels k = [...]" if pixels else "a radius eps = [...] (k/255)"
        raise ConfigError(f"[{where}] {other} = {table[other]!r}: kind = {kind!r} takes {said}; rename the key")
    eps = get_value(table, axis, where, list, [1, 2, 4, 8],
                    fix="a list of pixel counts, e.g. [1, 4, 16]" if pixels else
                    "a list of integers k meaning k/255, e.g. [1, 2, 4, 8]")
    keep = get_value(table, "keep", where, str, "successful", fix="'successful' or 'all'")
    size = get_value(table, "size", where, int, None, fix="a positive number of examples, or omit it for all")
    report_float = get_value(table, "report_float", where, bool, False, fix="true or false")
    params = {k: v for k, v in table.items() if k not in ("kind", "eps", "k", "keep", "size", "report_float")}
    try:
        return AttackConfig(kind=kind, eps=tuple(eps), keep=keep, size=size, params=tuple(params.items()),
                            report_float=report_float)
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


_LADDER_KEYS = ("steps_per_octave", "max_count", "search")


def _worst_case(table: dict, where: str, kind: str) -> AttackConfig:
    """``[attack] ladder = true``: worst-case pixels to failure (its ladder's keys apart from the attack's)."""
    if "k" in table or "eps" in table:
        key = "k" if "k" in table else "eps"
        raise ConfigError(f"[{where}] ladder = true with {key} = {table[key]!r}: a ladder searches its own counts; "
                          f"drop {key} (or ladder)")
    size = get_value(table, "size", where, int, None, fix="a number of images per model, or omit it for all")
    ladder = {key: table[key] for key in _LADDER_KEYS if key in table}
    params = {k: v for k, v in table.items() if k not in ("kind", "ladder", "size", *_LADDER_KEYS)}
    try:
        return AttackConfig(kind=kind, eps=(), size=size, params=tuple(params.items()),
                            ladder=tuple(sorted(ladder.items())))
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None
