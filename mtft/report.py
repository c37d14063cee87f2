"""`mtft report`: which balancer won and why, from run directories alone.

Reads only the run-directory contract (`.hydra/config.yaml`, `metrics.jsonl`, `summary.json`), so it
works on runs from any machine and never needs the trainer. Runs are grouped by balancer and
aggregated over seeds (mean ± std); the result is a Markdown table (printed and written to
`report.md`) and two plots: per-task validation curves and per-task weights over time.

Unfinished runs (no `summary.json`) and unreadable files are reported as warnings and left out;
a torn last line of `metrics.jsonl` (a killed run) is skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A run dir holds at least one of these; anything else next to the job dirs (report/, logs) is ignored.
RUN_MARKERS = (".hydra", "metrics.jsonl", "summary.json")
# Config keys that may differ between the runs of one comparison without a warning.
VARYING_OK = ("seed", "balancer", "logger", "cache_dir", "trainer.resume", "trainer.save_model")


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
    mean_final: Stat
    mean_best: Stat
    spread: Stat  # max - min across tasks of final / initial validation loss
    rose: Stat  # tasks whose final loss is above their best by more than the tolerance
    steps_per_s: Stat


@dataclass
class Report:
    tasks: list[str]
    results: list[BalancerResult]
    baseline: str
    tolerance: float
    warnings: list[str]


# --- reading -----------------------------------------------------------------------------------


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


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable ({e}); the run is treated as unfinished")
        return None
    return data if isinstance(data, dict) else None


def _read_config(run_dir: Path, warnings: list[str]) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        warnings.append(f"{path}: unreadable ({str(e).splitlines()[0]})")
        return {}
    return data if isinstance(data, dict) else {}


def balancer_name(run_dir: Path, summary: dict[str, Any] | None, config: dict[str, Any]) -> str:
    """summary.json's balancer; else Hydra's choice; else the module of the balancer's `_target_`."""
    if summary and summary.get("balancer"):
        return str(summary["balancer"])
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        try:
            choice = yaml.safe_load(hydra_yaml.read_text())["hydra"]["runtime"]["choices"]["balancer"]
            if choice:
                return str(choice)
        except (yaml.YAMLError, KeyError, TypeError):
            pass
    target = str((config.get("balancer") or {}).get("_target_", "unknown"))
    parts = target.split(".")
    return parts[-2] if len(parts) >= 2 else target


def _steps_per_s(
    rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, warnings: list[str]
) -> float:
    """Optimizer steps per second of training time (evaluations excluded), from the train rows."""
    seconds = [
        r["tokens"] / r["tokens_per_s"]
        for r in rows
        if r["split"] == "train" and r["task"] == "all" and r.get("tokens") and r.get("tokens_per_s")
    ]
    if seconds:
        return len(seconds) / sum(seconds)
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
    metrics_path, summary_path = run_dir / "metrics.jsonl", run_dir / "summary.json"
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
    seed = summary.get("seed", config.get("seed"))
    return Run(
        path=run_dir,
        balancer=balancer_name(run_dir, summary, config),
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
    )


# --- aggregating -------------------------------------------------------------------------------


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
        rose=Stat.of([float(sum(r.final[t] > r.best[t] * (1 + tolerance) for t in tasks)) for r in runs]),
        steps_per_s=Stat.of([r.steps_per_s for r in runs]),
    )


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


def _pct(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value * 100:+.1f}%"


def markdown_table(report: Report) -> str:
    """One row per balancer: the verdict columns first, then each task's final and best loss."""
    base = next((r for r in report.results if r.name == report.baseline), None)
    header = [
        "balancer",
        "runs",
        "mean final",
        f"Δ vs {report.baseline}",
        "mean best",
        f"Δ best vs {report.baseline}",
        "spread final/initial",
        "tasks rose",
        "steps/s",
        f"overhead vs {report.baseline}",
    ]
    for task in report.tasks:
        header += [f"{task} final", f"{task} best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for res in report.results:
        if base is not None:
            rel_final = res.mean_final.mean / base.mean_final.mean - 1
            rel_best = res.mean_best.mean / base.mean_best.mean - 1
            overhead = base.steps_per_s.mean / res.steps_per_s.mean - 1
        else:
            rel_final = rel_best = overhead = math.nan
        cells = [
            res.name,
            str(len(res.runs)),
            res.mean_final.fmt(),
            _pct(rel_final),
            res.mean_best.fmt(),
            _pct(rel_best),
            res.spread.fmt(),
            res.rose.fmt(1),
            res.steps_per_s.fmt(2),
            _pct(overhead),
        ]
        for task in report.tasks:
            cells += [res.final[task].fmt(), res.best[task].fmt()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(report: Report) -> str:
    return (
        "Validation losses are mean ± std over the runs (seeds) of each balancer; *final* is the last "
        "evaluation, *best* the lowest, *mean* their average over tasks. "
        f"*Δ vs {report.baseline}*: relative change of the mean final (and best) loss (negative = better). "
        "*spread final/initial*: max − min across tasks of the final validation loss divided by the "
        "step-0 one (small = tasks converged evenly). "
        f"*tasks rose*: tasks whose final loss is more than {report.tolerance:.0%} above their best "
        "(started to overfit). *steps/s*: optimizer steps per second of training time (evaluations "
        f"excluded); *overhead*: extra time per step vs {report.baseline}."
    )


def write_report(report: Report, out_dir: Path, table: str) -> list[Path]:
    """report.md and the PNG plots into `out_dir`; returns the files written."""
    from mtft.plots import plot_val_curves, plot_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    val_png = plot_val_curves(report, out_dir / "val_curves.png")
    weights_png = plot_weights(report, out_dir / "weights.png")
    runs = [
        f"| {res.name} | {run.seed if run.seed is not None else '?'} | {run.steps} | {run.path} |"
        for res in report.results
        for run in res.runs
    ]
    parts = [
        "# mtft report",
        "",
        table,
        "",
        legend(report),
        "",
        "## Validation loss per task",
        "",
        f"![validation curves]({val_png.name})",
        "",
        "## Task weights over time (normalized to sum 1 per step)",
        "",
        f"![task weights]({weights_png.name})",
        "",
        "## Runs",
        "",
        "| balancer | seed | steps | run dir |",
        "|---|---:|---:|---|",
        *runs,
    ]
    if report.warnings:
        parts += ["", "## Warnings", "", *(f"- {w}" for w in report.warnings)]
    md = out_dir / "report.md"
    md.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return [md, val_png, weights_png]


def main(argv: list[str]) -> int:
    """`mtft report PATH... [-o DIR]`: print the comparison table, write report.md and plots."""
    parser = argparse.ArgumentParser(
        prog="mtft report",
        description="Compare runs (e.g. a balancer sweep) from their run dirs: a Markdown table "
        "(mean ± std over seeds, one row per balancer) and per-task plots.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run dirs or multirun dirs")
    parser.add_argument(
        "-o", "--out", type=Path, metavar="DIR", help="report dir (default: <first PATH>/report)"
    )
    parser.add_argument("--baseline", default="uniform", help="balancer the others are compared with")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="relative rise above its best that counts a task as rising",
    )
    args = parser.parse_args(argv)
    report = build_report(args.paths, args.baseline, args.tolerance)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not report.results:
        print("mtft report: no finished runs to compare", file=sys.stderr)
        return 1
    table = markdown_table(report)
    print(table)
    files = write_report(report, args.out or args.paths[0] / "report", table)
    print("wrote " + ", ".join(map(str, files)), file=sys.stderr)
    return 0
