"""What every command of the CLI shares: the one-line error, then exit (no traceback)."""

from __future__ import annotations

from typing import NoReturn

import typer

from pixelray.errors import one_line

__all__ = ["fail"]


def fail(message: object, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` on one line to stderr and exit with ``code`` (2: bad input)."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)
