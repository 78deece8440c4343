"""The data layer's one error type, and how an error about many rows stays readable."""

from __future__ import annotations

MAX_LISTED = 20


class DataError(ValueError):
    """A dataset problem found before training starts: path, split, column, labels or images."""


def listed(items: list[str], sep: str = ", ") -> str:
    """At most MAX_LISTED items, then how many more: an error about 50,000 bad rows stays readable."""
    more = [f"... ({len(items) - MAX_LISTED} more)"] if len(items) > MAX_LISTED else []
    return sep.join(list(items[:MAX_LISTED]) + more)
