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
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _fail(owner: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{field}={value!r} is not allowed; {field} must be {allowed}.")


# Largest integer any config field accepts: counts and steps end up in int64 buffers, with room for step arithmetic.
MAX_INT = 2**62
# Largest rank a config accepts: wider than any model's hidden size; larger values only exhaust memory at wrap time.
MAX_CONFIG_RANK = 2**16


def check_int(
    owner: str, field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, cap: int = MAX_INT
) -> None:
    """An integer within ``[minimum, maximum]`` (either bound optional) and at most ``cap``.

    ``cap`` is a sanity limit far beyond real use (int64 buffers, memory); the message names it
    only to values above it, so ordinary mistakes read "an integer in [1, inf]".
    """
    upper = cap if maximum is None else min(maximum, cap)
    if not _is_int(value) or (minimum is not None and value < minimum) or value > upper:
        lo = "-inf" if minimum is None else str(minimum)
        if maximum is not None:
            hi = str(maximum)
        else:
            hi = str(cap) if _is_int(value) and value > cap else "inf"
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
