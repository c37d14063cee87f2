"""Building blocks of the config schema: choice types and range checks with one-line messages.

Every config dataclass checks its own fields in `__post_init__` with these helpers, so a bad value
fails when the config is built (before any data or model work) with a message naming the key.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from mtft.core.errors import MtftError


class Choice(str, Enum):
    """A config value from a fixed list. OmegaConf checks it and lists the choices on a bad value;
    a member equals (and formats as) its string, so code and serialized configs see plain names."""

    __str__ = str.__str__
    __format__ = str.__format__


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise `<key> must be <rule>, got <value>` unless `ok`."""
    if not ok:
        raise MtftError(f"{key} must be {rule}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def at_least(key: str, value: Any, low: float) -> None:
    """A finite number >= low (NaN and inf are refused)."""
    require(_number(value) and math.isfinite(value) and value >= low, key, f">= {low}", value)


def positive(key: str, value: Any) -> None:
    """A finite number > 0."""
    require(_number(value) and math.isfinite(value) and value > 0, key, "a finite number > 0", value)


def in_unit_interval(key: str, value: Any) -> None:
    """A number in [0, 1)."""
    require(_number(value) and 0 <= value < 1, key, "in [0, 1)", value)


def finite(key: str, value: Any) -> None:
    require(_number(value) and math.isfinite(value), key, "a finite number", value)


def choice(key: str, kind: type[Choice], value: Any) -> Any:
    """`value` as a member of `kind` (configs built in Python, not by OmegaConf, pass plain strings)."""
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise MtftError(f"{key} must be one of [{names}], got {value!r}") from None
