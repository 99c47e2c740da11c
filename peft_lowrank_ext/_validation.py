"""Config-time checks that raise ``ValueError`` naming the field, the value and what is allowed.

Shared by every method's config so that bad input fails when the config is built, never deep
inside a forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(owner: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{field}={value!r} is not allowed; {field} must be {allowed}.")


def check_int(owner: str, field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    """An integer within ``[minimum, maximum]`` (either bound optional)."""
    lo = "-inf" if minimum is None else str(minimum)
    hi = "inf" if maximum is None else str(maximum)
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(owner, field, value, f"an integer in [{lo}, {hi}]")


def check_real(
    owner: str,
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real number within the interval described by ``low``/``high`` and their openness."""
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    ok = _is_real(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        _fail(owner, field, value, f"a finite number in {interval}")


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(owner, field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, field, value, "True or False")
