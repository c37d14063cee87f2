"""Strict JSON, the one way mtft writes JSON into a run dir: a non-finite number (a diverged loss)
becomes null, so every file parses with any JSON reader, and a file written whole appears whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def finite_or_none(x: float) -> float | None:
    """`x`, or None where it is NaN or infinite: how strict JSON records a number that has none."""
    return x if math.isfinite(x) else None


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = None, ensure_ascii: bool = True) -> str:
    """`value` as strict JSON: NaN and infinities as null (json.dumps would write bare NaN)."""
    return json.dumps(_strict(value), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False)


def write_json(path: Path, value: Any) -> None:
    """`value` into `path`, indented, through a temporary file renamed over it: a reader (or a kill)
    never sees half a file."""
    write_atomic(path, dumps(value, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any], ensure_ascii: bool = True) -> None:
    """One strict-JSON line per row into `path`, replaced whole as `write_json` does."""
    write_atomic(path, "".join(dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; OSError or ValueError when it cannot be read or is not an object."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    return data


def write_atomic(path: Path, text: str) -> None:
    """Written beside `path` (same file system, the permissions a plain write gives), then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
