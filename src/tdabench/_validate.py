"""Argument validators shared by the declared arguments and the ``func`` layer.

Every check raises :class:`~tdabench.errors.ConfigError` naming the argument, what was given
and a fix ("pass ..."). They live below both :mod:`tdabench.func` and
:mod:`tdabench.algorithm` so neither keeps its own copy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from tdabench.errors import ConfigError

__all__ = ["check_choice", "check_int", "check_real"]


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (bools refused).

    Raises:
        ConfigError: naming ``name``, the value and an accepted example.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and int(value) < minimum:
        ok = False
    if ok and maximum is not None and int(value) > maximum:
        ok = False
    if not ok:
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f" <= {maximum}"
        example = max(minimum, 1) if minimum is not None else 1
        raise ConfigError(
            f"{name} must be an integer{lo}{hi}, got {value!r}; pass e.g. {name}={example}"
        )
    return int(value)


def check_real(
    name: str,
    value: Any,
    minimum: float | None = 0.0,
    *,
    strict: bool = False,
    below: float | None = None,
    at_most: float | None = None,
    fix: str = "",
) -> float:
    """``value`` as a finite ``float`` with ``value >= minimum`` (``>`` when ``strict``),
    ``value < below`` and ``value <= at_most`` where given.

    Raises:
        ConfigError: naming ``name``, the value, the accepted range and ``fix``.
    """
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
    if ok and minimum is not None:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if ok and below is not None:
        ok = float(value) < below
    if ok and at_most is not None:
        ok = float(value) <= at_most
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if strict else '>='} {minimum}")
        if below is not None:
            parts.append(f"< {below}")
        if at_most is not None:
            parts.append(f"<= {at_most}")
        rng = " and ".join(parts) or "finite"
        raise ConfigError(
            f"{name} must be a finite number {rng}, got {value!r}; {fix or f'pass a value {rng}'}"
        )
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], what: str = "") -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ConfigError: naming ``name``, the value and the choices.
    """
    if value not in tuple(choices):
        extra = f" ({what})" if what else ""
        raise ConfigError(f"{name} must be one of {tuple(choices)}{extra}, got {value!r}")
    return value
