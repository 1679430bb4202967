"""Moved to :mod:`pixelray.core.perturb`; this name stays because the README used it (kept for users' code)."""

from pixelray.core.perturb import *  # noqa: F401,F403
from pixelray.core.perturb import __all__  # noqa: F401
