"""The examples in pixelray's docstrings run and print what they say (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import pixelray

SKIP = ("pixelray.__main__",)  # runs the CLI on import
MODULES = sorted(m.name for m in pkgutil.walk_packages(pixelray.__path__, "pixelray.") if m.name not in SKIP)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_modules_hold_examples():
    names = ("pixelray.core.perturb", "pixelray.config.sweep", "pixelray.shards", "pixelray.models")
    attempted = sum(doctest.testmod(importlib.import_module(n)).attempted for n in names)
    assert attempted >= 8
