"""Checks for the settings a user can give (flags, YAML, Python), in one message style.

The option dataclasses call these in `__post_init__`, so a flag, a config.yaml key and a Python
argument are refused alike, before any work starts. A message names the setting (key and flag),
what is allowed and what was given, as scikit-learn does:
`batch_size (--batch-size) must be an integer >= 1, got 0`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection

from cxrfusion.errors import CxrError


class InvalidOption(CxrError, ValueError):
    """A setting out of its range or choices: a user mistake (CxrError) and a ValueError."""


def setting(name: str) -> str:
    """`batch_size (--batch-size)`: the key as YAML spells it and the flag as the CLI does."""
    return f"{name} (--{name.replace('_', '-')})"


def _bounds(low: float | None, high: float | None, above: float | None, below: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low:g}, {high:g}]"
    parts = [
        f"{word} {value:g}"
        for word, value in ((">=", low), ("above", above), ("<=", high), ("below", below))
        if value is not None
    ]
    return " " + " and ".join(parts) if parts else ""


def check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> None:
    """Refuse a non-number (or non-integer), NaN, or a value outside the bounds.

    Args:
        low / high: inclusive bounds; above / below: exclusive bounds.
    """
    kind = "an integer" if integer else "a number"
    expected = f"{setting(name)} must be {kind}{_bounds(low, high, above, below)}, got {value!r}"
    types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or math.isnan(value):
        raise InvalidOption(expected)
    if (
        (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise InvalidOption(expected)


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    """Refuse a value that is not one of `choices`."""
    if value not in choices:
        raise InvalidOption(f"{setting(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidOption(f"{setting(name)} must be true or false, got {value!r}")


def check_text(name: str, value: object) -> None:
    """Refuse anything but a non-empty string or path."""
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise InvalidOption(f"{setting(name)} must be a non-empty text or path, got {value!r}")
