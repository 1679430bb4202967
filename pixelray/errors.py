"""Errors a user acts on: each message names the file, key or value and the fix, in one line.

:func:`one_line` and :func:`first_line` put another library's message (Arrow's, torch's, Ray's)
inside such a line.
"""

from __future__ import annotations

__all__ = ["SweepError", "SweepStopped", "TrainError", "first_line", "one_line"]


class SweepError(RuntimeError):
    """A sweep that cannot go on; the message says why and what to do."""


class SweepStopped(SweepError):
    """A sweep ended by a signal (SIGTERM from ``ray job stop``, SIGINT from Ctrl-C) after cleaning up:
    its finished units are kept. ``exit_code`` is the shell's 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainError(RuntimeError):
    """A fine-tune that cannot start or go on; the message says why and what to do."""


def one_line(message: object, limit: int | None = None) -> str:
    """``message`` (an exception or a text) on one line: every run of whitespace, newlines included,
    becomes one space; cut to ``limit`` characters when given.

        >>> one_line(ValueError("bad value\\n  in row 3"))
        'bad value in row 3'
    """
    text = " ".join(str(message).split())
    return text if limit is None else text[:limit]


def first_line(exc: BaseException, *, typed: bool = False, limit: int | None = None) -> str:
    """The first non-blank line of ``exc``'s message, stripped: for messages that run to a page
    (torch's unpickling errors, Arrow's). An empty message gives the exception's type name;
    ``typed`` puts the type name first (``"UnpicklingError: ..."``); cut to ``limit`` characters when given.

        >>> first_line(ValueError("bad magic number\\n(a page of details)"), typed=True)
        'ValueError: bad magic number'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if typed:
        text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    else:
        text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
