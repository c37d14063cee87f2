"""Reading run directories: the run-directory contract (`.hydra/config.yaml`, `metrics.jsonl`,
`summary.json`) into `Run`s, so the report works on runs from any machine and never needs the trainer.

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

from mtft.core.rundir import CONFIG, EVAL, HYDRA_DIR, METRICS, SUMMARY

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


def read_metrics(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; malformed lines (a torn last line of a killed run) are skipped."""
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not (
                isinstance(row, dict)
                and isinstance(row.get("step"), int)
                and isinstance(row.get("split"), str)
                and isinstance(row.get("task"), str)
            ):
                raise ValueError("not a metrics row")
        except ValueError:
            where = "its last line is truncated" if number == len(lines) else f"line {number} is malformed"
            warnings.append(f"{path}: {where} (killed or still running?); that line is ignored")
            continue
        rows.append(row)
    return rows


def _read_json(
    path: Path, warnings: list[str], consequence: str = "the run is treated as unfinished"
) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e}); {consequence}")
        return None
    return data if isinstance(data, dict) else None


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


def balancer_name(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """summary.json's balancer, else the config's `balancer.name` (the one name a run has)."""
    return str(summary.get("balancer") or (config.get("balancer") or {}).get("name") or "unknown")


def _steps_per_s(
    rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, warnings: list[str]
) -> float:
    """Optimizer steps per second from the median time of a training step (evaluations excluded), so a
    few steps slowed by a busy machine do not move it."""
    seconds = [
        r["tokens"] / r["tokens_per_s"]
        for r in rows
        if r["split"] == "train" and r["task"] == "all" and r.get("tokens") and r.get("tokens_per_s")
    ]
    if seconds:
        return 1 / statistics.median(seconds)
    wall = summary.get("wall_s")
    if wall:
        warnings.append(
            f"{path}: no timed train rows in metrics.jsonl; steps/s from wall time (evaluations included)"
        )
        return summary["steps"] / wall
    return math.nan


def _per_task(values: Any, tasks: list[str]) -> dict[str, float]:
    """task -> float; a missing or non-numeric value (a diverged run) becomes NaN and is left out of means."""
    values = values if isinstance(values, dict) else {}
    return {
        t: float(v) if isinstance(v := values.get(t), int | float) and not isinstance(v, bool) else math.nan
        for t in tasks
    }


def load_run(run_dir: Path, warnings: list[str]) -> Run | None:
    """Read one run dir; None (with a warning saying why) if it cannot be compared."""
    config = _read_config(run_dir, warnings)
    metrics_path, summary_path = run_dir / METRICS, run_dir / SUMMARY
    rows = read_metrics(metrics_path, warnings) if metrics_path.exists() else []
    summary = _read_json(summary_path, warnings) if summary_path.exists() else None
    if summary is None:
        planned = (config.get("trainer") or {}).get("max_steps", "?")
        reached = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
        if reached is None:
            why = "no metrics.jsonl either: it never started training"
        else:
            why = f"metrics.jsonl stops at step {reached} of {planned}"
        warnings.append(f"{run_dir}: skipped, no summary.json (still running, killed or failed; {why})")
        return None
    missing = [k for k in ("tasks", "final_val_loss", "best_val_loss", "steps") if k not in summary]
    if missing:
        warnings.append(f"{summary_path}: skipped, missing {', '.join(missing)}")
        return None
    if not metrics_path.exists():
        warnings.append(f"{run_dir}: no metrics.jsonl; table values from summary.json, no curves")

    tasks = list(summary["tasks"])
    val: dict[str, dict[int, float]] = {t: {} for t in tasks}
    weights: dict[int, dict[str, float]] = {}
    for r in rows:
        task, loss = r["task"], r.get("loss")
        if r["split"] == "val" and task in val and isinstance(loss, int | float):
            val[task][int(r["step"])] = float(loss)
        elif r["split"] == "train" and task in val and isinstance(r.get("weight"), int | float):
            weights.setdefault(int(r["step"]), {})[task] = float(r["weight"])
    initial = summary.get("initial_val_loss") or {t: val[t].get(0) for t in tasks}
    evaluation = _read_eval(run_dir, warnings) or summary.get("eval") or {}
    seed = summary.get("seed", config.get("seed"))
    return Run(
        path=run_dir,
        balancer=balancer_name(summary, config),
        seed=int(seed) if isinstance(seed, int) else None,
        tasks=tasks,
        steps=int(summary["steps"]),
        initial=_per_task(initial, tasks),
        final=_per_task(summary["final_val_loss"], tasks),
        best=_per_task(summary["best_val_loss"], tasks),
        steps_per_s=_steps_per_s(rows, summary, run_dir, warnings),
        config=config,
        val=val,
        weights=weights,
        eval=_eval_metrics(evaluation, tasks),
        eval_score=_per_task({"mean": evaluation.get("mean_score")}, ["mean"])["mean"],
    )


def _read_eval(run_dir: Path, warnings: list[str]) -> dict[str, Any] | None:
    path = run_dir / EVAL
    if not path.exists():
        return None
    return _read_json(path, warnings, "the run's eval columns are left empty")


def _eval_metrics(evaluation: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from eval.json (or summary.json's `eval`), for the run's tasks."""
    per_task = evaluation.get("tasks") if isinstance(evaluation.get("tasks"), dict) else {}
    out = {}
    for task in tasks:
        metrics = (per_task.get(task) or {}).get("metrics")
        if isinstance(metrics, dict) and metrics:
            out[task] = _per_task(metrics, list(metrics))
    return out
