"""Parsing of the human units users type: durations (``30m``, ``500ms``) and ranges (``1-5s``)."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number, or a string like ``2``, ``2s``, ``500ms``, ``30m``, ``1.5h``.

    Raises ``ValueError`` with a message fit to show a user.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like 30s, 500ms, 5m or 2h, got {value!r}")
    number, unit = match.groups()
    return float(number) * _UNITS[unit or ""]


def parse_duration_range(value: str | int | float) -> tuple[float, float]:
    """``(low, high)`` seconds from ``2s`` (a fixed value) or ``1-5s`` / ``500ms-2s`` (a range)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = parse_duration(value)
        return seconds, seconds
    text = str(value).strip()
    match = re.match(
        r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*-\s*(\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)?)$", text
    )
    if match:
        low_number, low_unit, high_text = match.groups()
        high = parse_duration(high_text)
        # "1-5s": the unit written once at the end applies to both ends
        if low_unit is None:
            high_unit = re.sub(r"[\d.\s]", "", high_text)
            low = parse_duration(low_number + high_unit)
        else:
            low = parse_duration(low_number + low_unit)
        if low > high:
            raise ValueError(f"range {value!r} goes down: {low:g}s is above {high:g}s")
        return low, high
    seconds = parse_duration(text)
    return seconds, seconds
