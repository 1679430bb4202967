"""The examples in pixelray's docstrings run and print what they say (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import pixelray

SKIP = ("pixelray.__main__",)  # runs the CLI on import
PACKAGE = Path(pixelray.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# The modules whose source holds an example (``>>>``), found by reading the files, not by doctest:
# a module listed here whose examples doctest does not collect fails below instead of passing empty.
MODULES = sorted(
    name
    for path in PACKAGE.rglob("*.py")
    if ">>>" in path.read_text(encoding="utf-8") and (name := _module_name(path)) not in SKIP
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} holds '>>>' but doctest ran none of its examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_modules_hold_examples():
    assert len(MODULES) >= 10, MODULES  # the scan found the package's examples
    names = ("pixelray.core.perturb", "pixelray.config.sweep", "pixelray.shards", "pixelray.models")
    assert set(names) <= set(MODULES)
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in names)
    assert attempted >= 8
