"""Renamed arguments keep working for one release, with a warning that names the new spelling."""

from __future__ import annotations

import warnings
from typing import Any


class LightningLatencyDeprecationWarning(DeprecationWarning):
    """Shown by default (see ``lightning_latency/__init__.py``): an argument or name will go in the next release."""


def deprecated(message: str) -> None:
    warnings.warn(message, LightningLatencyDeprecationWarning, stacklevel=3)


def renamed(owner: str, old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value to use for ``new`` when a caller may still pass the old name ``old``.

    ``old_value`` None means the old name was not used. Passing both (the new one not at its default) is an error.
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise ValueError(f"{owner}: pass `{new}` only; `{old}` is its deprecated name (got {old}={old_value!r} and "
                         f"{new}={new_value!r}).")
    warnings.warn(f"{owner}(`{old}`=...) is deprecated and will be removed in the next release: pass "
                  f"`{new}={old_value!r}` instead.", LightningLatencyDeprecationWarning, stacklevel=3)
    return old_value


__all__ = ["LightningLatencyDeprecationWarning", "deprecated", "renamed"]
