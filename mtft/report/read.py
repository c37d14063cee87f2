"""Reading run directories: the run-directory contract (`.hydra/config.yaml`, `metrics.jsonl`,
`summary.json`, `eval.json`) into `Run`s, so the report works on runs from any machine and never needs
the trainer. The files are read through the records that write them (`mtft.core.rundir`).

Unfinished runs (no `summary.json`) and unreadable files are reported as warnings and left out;
a torn last line of `metrics.jsonl` (a killed run) is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtft.core.jsonfile import read_json_object
from mtft.core.rundir import CONFIG, EVAL, HYDRA_DIR, METRICS, SUMMARY, EvalResult, MetricsRow, Summary

# A run dir holds at least one of these; anything else next to the job dirs (report/, logs) is ignored.
RUN_MARKERS = (HYDRA_DIR, METRICS, SUMMARY)


@dataclass
class Run:
    """One finished run, as read from its directory."""

    path: Path
    balancer: str
    seed: int | None
    tasks: list[str]
    steps: int
    initial: dict[str, float]
    final: dict[str, float]
    best: dict[str, float]
    steps_per_s: float
    config: dict[str, Any] = field(default_factory=dict)
    val: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> step -> loss
    weights: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> task -> weight
    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # eval.json: task -> metric -> value
    eval_score: float = math.nan  # eval.json's mean over tasks of each task's first metric


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _numeric_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)


def find_run_dirs(paths: list[Path], warnings: list[str]) -> list[Path]:
    """Each PATH is a run dir or a multirun dir whose job dirs are run dirs (one level down)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            warnings.append(f"{path}: not a directory; skipped")
        elif is_run_dir(path):
            found.append(path)
        else:
            jobs = sorted((p for p in path.iterdir() if p.is_dir() and is_run_dir(p)), key=_numeric_key)
            if not jobs:
                warnings.append(
                    f"{path}: no run dirs in it (a run dir holds .hydra/, metrics.jsonl, summary.json)"
                )
            found.extend(jobs)
    return found


def read_metrics(path: Path, warnings: list[str]) -> list[MetricsRow]:
    """The rows of metrics.jsonl; malformed lines (a torn last line of a killed run) are skipped."""
    rows: list[MetricsRow] = []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(MetricsRow.from_dict(json.loads(line)))
        except ValueError:
            where = "its last line is truncated" if number == len(lines) else f"line {number} is malformed"
            warnings.append(f"{path}: {where} (killed or still running?); that line is ignored")
    return rows


def _read_config(run_dir: Path, warnings: list[str]) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        warnings.append(f"{path}: unreadable ({str(e).splitlines()[0]})")
        return {}
    return data if isinstance(data, dict) else {}


def balancer_name(summary: Summary, config: dict[str, Any]) -> str:
    """summary.json's balancer, else the config's `balancer.name` (the one name a run has)."""
    return summary.balancer or str((config.get("balancer") or {}).get("name") or "unknown")


def _steps_per_s(rows: list[MetricsRow], summary: Summary, path: Path, warnings: list[str]) -> float:
    """Optimizer steps per second from the median time of a training step (evaluations excluded), so a
    few steps slowed by a busy machine do not move it."""
    seconds = [
        r.tokens / r.tokens_per_s
        for r in rows
        if r.split == "train" and r.task == "all" and r.tokens and r.tokens_per_s
    ]
    if seconds:
        return 1 / statistics.median(seconds)
    if math.isfinite(summary.wall_s) and summary.wall_s:
        warnings.append(
            f"{path}: no timed train rows in metrics.jsonl; steps/s from wall time (evaluations included)"
        )
        return summary.steps / summary.wall_s
    return math.nan


def _per_task(values: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """task -> float; a task missing from the file is NaN, as a null (a diverged run) already is, and is
    left out of means."""
    return {t: values.get(t, math.nan) for t in tasks}


def _read_summary(
    run_dir: Path, config: dict[str, Any], rows: list[MetricsRow], warnings: list[str]
) -> Summary | None:
    """summary.json; None (with a warning saying why) for an unfinished run or one that cannot be compared."""
    path = run_dir / SUMMARY
    try:
        data = read_json_object(path) if path.exists() else None
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e}); the run is treated as unfinished")
        data = None
    if data is None:
        planned = (config.get("trainer") or {}).get("max_steps", "?")
        reached = max((r.step for r in rows), default=None)
        if reached is None:
            why = "no metrics.jsonl either: it never started training"
        else:
            why = f"metrics.jsonl stops at step {reached} of {planned}"
        warnings.append(f"{run_dir}: skipped, no summary.json (still running, killed or failed; {why})")
        return None
    try:
        return Summary.from_dict(data)
    except ValueError as e:
        warnings.append(f"{path}: skipped, {e}")
        return None


def load_run(run_dir: Path, warnings: list[str]) -> Run | None:
    """Read one run dir; None (with a warning saying why) if it cannot be compared."""
    config = _read_config(run_dir, warnings)
    metrics_path = run_dir / METRICS
    rows = read_metrics(metrics_path, warnings) if metrics_path.exists() else []
    summary = _read_summary(run_dir, config, rows, warnings)
    if summary is None:
        return None
    if not metrics_path.exists():
        warnings.append(f"{run_dir}: no metrics.jsonl; table values from summary.json, no curves")

    tasks = summary.tasks
    val: dict[str, dict[int, float]] = {t: {} for t in tasks}
    weights: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.split == "val" and r.task in val and r.loss is not None:
            val[r.task][r.step] = float(r.loss)
        elif r.split == "train" and r.task in val and r.weight is not None:
            weights.setdefault(r.step, {})[r.task] = float(r.weight)
    initial = summary.initial_val_loss or {t: val[t].get(0, math.nan) for t in tasks}
    evaluation = _read_eval(run_dir, warnings) or summary.eval
    seed = summary.seed if summary.seed is not None else config.get("seed")
    return Run(
        path=run_dir,
        balancer=balancer_name(summary, config),
        seed=seed if isinstance(seed, int) else None,
        tasks=tasks,
        steps=summary.steps,
        initial=_per_task(initial, tasks),
        final=_per_task(summary.final_val_loss, tasks),
        best=_per_task(summary.best_val_loss, tasks),
        steps_per_s=_steps_per_s(rows, summary, run_dir, warnings),
        config=config,
        val=val,
        weights=weights,
        eval=_eval_metrics(evaluation, tasks) if evaluation else {},
        eval_score=math.nan if evaluation is None or evaluation.mean_score is None else evaluation.mean_score,
    )


def _read_eval(run_dir: Path, warnings: list[str]) -> EvalResult | None:
    if not (run_dir / EVAL).exists():
        return None
    try:
        return EvalResult.read(run_dir)
    except (OSError, ValueError) as e:
        warnings.append(f"{run_dir / EVAL}: unreadable ({e}); the run's eval columns are left empty")
        return None


def _eval_metrics(evaluation: EvalResult, tasks: list[str]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from eval.json (or summary.json's `eval`), for the run's tasks."""
    return {t: dict(entry.metrics) for t in tasks if (entry := evaluation.tasks.get(t)) and entry.metrics}
