"""Moved to :mod:`pixelray.core.spec`; this name stays because the README used it (kept for users' code)."""

from pixelray.core.spec import *  # noqa: F401,F403
from pixelray.core.spec import __all__  # noqa: F401
