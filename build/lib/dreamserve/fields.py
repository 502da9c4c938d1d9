"""Reading request fields: optional values, choices, bounded text and numbers, each failure a
400 naming the parameter and what is valid. JSON values, or the strings a form sends."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dreamserve.errors import InvalidParameter


def given(fields: Mapping[str, Any], name: str) -> Any:
    """The value of an optional field, or None when absent, null or an empty form value."""
    value = fields.get(name)
    return None if value is None or value == "" else value


def choice(fields: Mapping[str, Any], name: str, valid: tuple[str, ...], default: str) -> str:
    value = given(fields, name)
    if value is None:
        return default
    if value not in valid:
        raise InvalidParameter(name, value, ", ".join(valid))
    return str(value)


def text(fields: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = given(fields, name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidParameter(name, value, f"text of at most {limit} characters")
    return value


def integer(fields: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = given(fields, name)
    if value is None:
        return None
    number = as_number(value)
    if number is None or number != int(number) or not low <= number <= high:
        raise InvalidParameter(name, value, f"integer {low}-{high}")
    return int(number)


def number(fields: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = given(fields, name)
    if value is None:
        return None
    number = as_number(value)
    if number is None or not low <= number <= high:
        raise InvalidParameter(name, value, f"number {low:g}-{high:g}")
    return number


def as_number(value: Any) -> float | None:
    """A JSON number, or a string holding one (multipart sends strings); None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            if "_" in value:  # float() takes "1_0"; no client means 10 by it
                return None
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None
