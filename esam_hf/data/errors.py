"""The data layer's one error type, and how an error about many rows stays readable."""

from __future__ import annotations

MAX_LISTED = 20


class DataError(ValueError):
    """A dataset problem found before training starts: path, split, column, labels or images."""


def listed(items: list[str], sep: str = ", ") -> str:
    """At most MAX_LISTED items, then how many more: an error about 50,000 bad rows stays readable."""
    more = [f"... ({len(items) - MAX_LISTED} more)"] if len(items) > MAX_LISTED else []
    return sep.join(list(items[:MAX_LISTED]) + more)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write that ran out of disk space: an OSError with ENOSPC, or what torch ("unexpected
    pos": a write that came up short) and safetensors ("No space left on device (os error 28)") raise for it."""
    import errno

    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
