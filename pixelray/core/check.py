"""One home for the small value checks every spec shares: "an integer >= 1" and its friends.

Each raises ValueError in the house format ``"<name>: <value!r> is invalid; it must be <rule>"``
(a bool is never taken for an integer), and returns the value, so a check reads as an assignment.

    >>> check_int(8, "count")
    8
    >>> check_int(0, "count")
    Traceback (most recent call last):
    ...
    ValueError: count: 0 is invalid; it must be an integer >= 1
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_int", "is_int"]


def is_int(value: Any) -> bool:
    """An integer, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, name: str, low: int = 1, high: int | None = None, *, high_text: str | None = None,
              none_ok: bool = False) -> Any:
    """``value`` when it is an integer in ``low..high`` (``high`` None: no upper bound); else ValueError.

    ``high_text`` shows the bound in messages (e.g. ``"2**31-1"``); ``none_ok`` lets None through.
    """
    if value is None and none_ok:
        return None
    if is_int(value) and value >= low and (high is None or value <= high):
        return value
    rule = f"an integer >= {low}" if high is None else f"an integer in {low}..{high_text or high}"
    raise ValueError(f"{name}: {value!r} is invalid; it must be {rule}{' or None' if none_ok else ''}")
