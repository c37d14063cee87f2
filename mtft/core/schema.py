"""Building blocks of the config schema: choice types and range checks with one-line messages.

Every config dataclass checks its own fields in `__post_init__` with these helpers, so a bad value
fails when the config is built (before any data or model work) with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

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


# The largest integer setting: counts and sizes beyond it are typos, and it fits every seed and
# tensor index type (numpy seeds stop at 2**32 - 1, torch's at 2**64 - 1).
MAX_INT = 2**31 - 1


def at_least(key: str, value: Any, low: float) -> None:
    """A finite number >= low (NaN and inf are refused); an integer also <= MAX_INT."""
    require(_number(value) and math.isfinite(value) and value >= low, key, f">= {low}", value)
    require(not isinstance(value, int) or value <= MAX_INT, key, f"<= {MAX_INT}", value)


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


def refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Raise on a key a schema dataclass does not have. Hydra's `+key=value` adds keys even under a
    typed section, and `OmegaConf.to_object` would then drop them silently (`+trainer.eval_intervl=1`
    would train as if never given); only open dicts (`dict[str, ...]` fields) take new keys."""
    kind = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node:
        path = f"{prefix}{key}"
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else "`mtft train --cfg job` lists the keys"
            raise MtftError(f"unknown key {path}: a '+' cannot add keys to a typed section; {hint}")
        child = node._get_node(key)
        if OmegaConf.is_interpolation(node, key) or child._is_none() or child._is_missing():
            continue
        if isinstance(child, DictConfig):
            refuse_unknown_keys(child, f"{path}.")
        elif isinstance(child, ListConfig):
            for i, item in enumerate(child):
                if isinstance(item, DictConfig):
                    refuse_unknown_keys(item, f"{path}[{i}].")
