"""metrics.jsonl rows -> named scalar series, the one naming every dashboard logger shares.

A task row becomes `<split>/<task>/loss` (and `weight/<task>` for its balancer weight); a mixture
(`task == "all"`) row becomes `<split>/loss`, `train/lr`, `train/tokens_per_s`, ...; balancer
diagnostics already carry their own namespace (`coba/rcs/<task>`, `famo/logit/<task>`,
`gradnorm/G/<task>`) and keep it. Missing losses (a task absent from the batch) and non-numbers
are left out, so a dashboard never shows a fake zero.
"""

from __future__ import annotations

import math
from typing import Any

from mtft.loggers.base import Row

_ROW_KEYS = ("step", "split", "task")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def row_series(row: Row) -> dict[str, float]:
    """The named scalars of one metrics.jsonl row."""
    split, task = row["split"], row["task"]
    out: dict[str, float] = {}
    for key, raw in row.items():
        value = _number(raw)
        if key in _ROW_KEYS or value is None:
            continue
        if task != "all":
            name = f"weight/{task}" if key == "weight" else f"{split}/{task}/{key}"
        elif "/" in key:
            name = key  # a balancer diagnostic, already namespaced
        else:
            name = f"{split}/{key}"
        out[name] = value
    return out


def series_by_step(rows: list[Row]) -> dict[int, dict[str, float]]:
    """Group the rows' scalars by step (a logger call usually holds one step's rows)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        out.setdefault(int(row["step"]), {}).update(row_series(row))
    return out
