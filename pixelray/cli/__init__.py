"""The ``pixelray`` command line (typer): one module per command group, the demo beside them."""

from pixelray.cli.main import app

__all__ = ["app"]
