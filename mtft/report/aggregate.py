"""Aggregating runs per balancer over seeds (mean ± std), with the curves the plots draw."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtft.report.read import Run, find_run_dirs, load_run

# Config keys that may differ between the runs of one comparison without a warning.
VARYING_OK = (
    "seed", "balancer", "logger", "cache_dir", "trainer.resume", "trainer.save_model", "eval",
    "trainer.sample_interval", "trainer.eval_at_end",
)  # fmt: skip


@dataclass
class Stat:
    """Mean ± sample standard deviation over the runs (seeds) of one balancer."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class BalancerResult:
    """Everything the table and the plots show for one balancer."""

    name: str
    runs: list[Run]
    final: dict[str, Stat]
    best: dict[str, Stat]
    rise: dict[str, Stat]  # final / best - 1: how far a task has come back up from its best
    mean_final: Stat
    mean_best: Stat
    spread: Stat  # max - min across tasks of final / initial validation loss
    rose: Stat  # tasks whose final loss is above their best by more than the tolerance
    steps_per_s: Stat
    eval: dict[tuple[str, str], Stat]  # (task, metric) -> over the runs with eval.json
    eval_score: Stat  # eval.json's mean score
    weight_share: dict[str, Stat]  # the task's mean weight / sum of weights once they move
    weight_sd: dict[str, Stat]  # its standard deviation over those steps (per run, then over runs)


@dataclass
class Report:
    tasks: list[str]
    results: list[BalancerResult]
    baseline: str
    tolerance: float
    warnings: list[str]

    @property
    def eval_columns(self) -> list[tuple[str, str]]:
        """(task, metric) of every eval result any run has, in task order (none: no eval columns)."""
        found = {key for res in self.results for key, stat in res.eval.items() if stat.n}
        return [(t, m) for t in self.tasks for m in sorted(m for task, m in found if task == t)]


# --- reading -----------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _varies(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def label_variants(runs: list[Run]) -> None:
    """Runs of one balancer with different balancer settings (a tau sweep) get their own rows."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.balancer, []).append(run)
    for name, group in by_name.items():
        flat = [_flatten(r.config.get("balancer") or {}) for r in group]
        keys = sorted({k for f in flat for k in f})
        differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        if differing:
            for run, f in zip(group, flat, strict=True):
                run.balancer = f"{name} ({', '.join(f'{k}={f.get(k)}' for k in differing)})"


def check_comparable(runs: list[Run], warnings: list[str]) -> list[Run]:
    """Keep the runs on the first run's tasks; warn when settings other than balancer/seed differ."""
    tasks = runs[0].tasks
    kept = []
    for run in runs:
        if run.tasks != tasks:
            warnings.append(f"{run.path}: skipped, its tasks {run.tasks} differ from {tasks}")
        else:
            kept.append(run)
    flat = [_flatten(r.config) for r in kept if r.config]
    keys = sorted({k for f in flat for k in f if not _varies(k, VARYING_OK)})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    if differing:
        shown = ", ".join(differing[:6]) + (" ..." if len(differing) > 6 else "")
        warnings.append(f"runs differ in more than balancer and seed ({shown}); compare with care")
    return kept


def aggregate(name: str, runs: list[Run], tasks: list[str], tolerance: float) -> BalancerResult:
    per_run = [moving_shares(r, tasks) for r in runs]

    def shares(task: str) -> list[list[float]]:
        return [m[task] for m in per_run]

    def spread(run: Run) -> float:
        normalized = [run.final[t] / run.initial[t] for t in tasks if run.initial[t] > 0]
        if len(normalized) < len(tasks) or not all(map(math.isfinite, normalized)):
            return math.nan
        return max(normalized) - min(normalized)

    return BalancerResult(
        name=name,
        runs=runs,
        final={t: Stat.of([r.final[t] for r in runs]) for t in tasks},
        best={t: Stat.of([r.best[t] for r in runs]) for t in tasks},
        mean_final=Stat.of([statistics.fmean(r.final[t] for t in tasks) for r in runs]),
        mean_best=Stat.of([statistics.fmean(r.best[t] for t in tasks) for r in runs]),
        spread=Stat.of([spread(r) for r in runs]),
        rise={t: Stat.of([r.final[t] / r.best[t] - 1 for r in runs if r.best[t] > 0]) for t in tasks},
        rose=Stat.of([float(sum(r.final[t] > r.best[t] * (1 + tolerance) for t in tasks)) for r in runs]),
        steps_per_s=Stat.of([r.steps_per_s for r in runs]),
        eval={
            (t, m): Stat.of([r.eval.get(t, {}).get(m, math.nan) for r in runs])
            for t in tasks
            for m in {m for r in runs for m in r.eval.get(t, {})}
        },
        eval_score=Stat.of([r.eval_score for r in runs]),
        weight_share={t: Stat.of([statistics.fmean(s) for s in shares(t) if s]) for t in tasks},
        weight_sd={t: Stat.of([statistics.pstdev(s) for s in shares(t) if s]) for t in tasks},
    )


def moving_shares(run: Run, tasks: list[str]) -> dict[str, list[float]]:
    """Each task's weight / sum of weights at every step from the first step whose weights differ from
    step 1's on (a warm-up of equal weights left out); empty for weights that never move."""
    steps = sorted(s for s, w in run.weights.items() if all(t in w for t in tasks) and sum(w.values()) > 0)
    shares = [[run.weights[s][t] / sum(run.weights[s].values()) for t in tasks] for s in steps]
    first = shares[0] if shares else []
    start = next(
        (
            i
            for i, row in enumerate(shares)
            if max(abs(a - b) for a, b in zip(row, first, strict=True)) > 1e-9
        ),
        len(shares),
    )
    moving = shares[start:]
    return {t: [row[j] for row in moving] for j, t in enumerate(tasks)}


Curve = tuple[list[int], list[float], list[float], list[float]]  # steps, mean, min, max over runs


def _curve(per_run: list[dict[int, float]]) -> Curve:
    steps = sorted({s for run in per_run for s in run})
    values = [[run[s] for run in per_run if s in run] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def val_curve(result: BalancerResult, task: str) -> Curve:
    """One task's validation loss over steps, over the balancer's runs."""
    return _curve([run.val.get(task, {}) for run in result.runs])


def weight_curve(result: BalancerResult, task: str) -> Curve:
    """One task's weight over steps, each step's weights normalized to sum 1 (scales differ by balancer)."""
    per_run = []
    for run in result.runs:
        normalized = {}
        for step, weights in run.weights.items():
            total = sum(weights.values())
            if total > 0 and task in weights:
                normalized[step] = weights[task] / total
        per_run.append(normalized)
    return _curve(per_run)


def _order(name: str, baseline: str) -> tuple[int, str]:
    return (0 if name == baseline else 1, name)


def build_report(paths: list[Path], baseline: str = "uniform", tolerance: float = 0.01) -> Report:
    """Read every run under `paths` and aggregate them per balancer."""
    warnings: list[str] = []
    runs = [run for d in find_run_dirs(paths, warnings) if (run := load_run(d, warnings)) is not None]
    if not runs:
        return Report([], [], baseline, tolerance, warnings)
    runs = check_comparable(runs, warnings)
    label_variants(runs)
    tasks = runs[0].tasks
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.balancer, []).append(run)
    results = [
        aggregate(n, groups[n], tasks, tolerance) for n in sorted(groups, key=lambda n: _order(n, baseline))
    ]
    if baseline not in groups:
        warnings.append(f"no '{baseline}' runs: the columns relative to it are left empty (--baseline NAME)")
    return Report(tasks, results, baseline, tolerance, warnings)


# --- presenting --------------------------------------------------------------------------------
