"""Errors a user acts on: each message names the file, key or value and the fix, in one line."""

from __future__ import annotations

__all__ = ["SweepError"]


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message says why and what to do."""
