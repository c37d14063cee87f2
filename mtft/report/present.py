"""Presenting a report: the Markdown table, its legend, and report.md with the plots beside it."""

from __future__ import annotations

import math
from pathlib import Path

from mtft.report.aggregate import Report, Stat


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
        "steps/s (unpaired)",
        f"overhead vs {report.baseline} (unpaired)",
    ]
    for task in report.tasks:
        header += [f"{task} final", f"{task} best", f"{task} rise"]
    evals = report.eval_columns
    if evals:
        header += ["eval score", *(f"{task} {metric}" for task, metric in evals)]
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
            rise = res.rise[task]
            cells += [res.final[task].fmt(), res.best[task].fmt(), _pct(rise.mean) if rise.n else "–"]
        if evals:
            cells += [
                res.eval_score.fmt(1),
                *(res.eval[key].fmt(1) if key in res.eval else "–" for key in evals),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def weights_table(report: Report) -> str:
    """Each task's share of the weights (weight / sum) once they move, ± its standard deviation over
    those steps (averaged over seeds): where a balancer put the weight, and how steadily."""
    header = ["balancer", *(f"{t} share ± sd" for t in report.tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(report.tasks)) + "|"]
    for res in report.results:
        cells = [
            f"{res.weight_share[t].mean:.3f} ± {res.weight_sd[t].mean:.3f}"
            if res.weight_share[t].n
            else "fixed"
            for t in report.tasks
        ]
        lines.append("| " + " | ".join([res.name, *cells]) + " |")
    return "\n".join(lines)


def winners(report: Report) -> str:
    """Which balancer has the lowest mean final validation loss, per task and overall, with the seed
    spread of the winner and the margin to the runner-up (a margin inside the spread is a tie)."""

    def verdict(label: str, stats: list[tuple[str, Stat]]) -> str:
        ranked = sorted(((st.mean, name, st) for name, st in stats if st.n), key=lambda x: (x[0], x[1]))
        if not ranked:
            return f"{label}: –"
        mean, name, st = ranked[0]
        text = f"{label}: **{name}** {st.fmt()}"
        if len(ranked) > 1:
            margin = ranked[1][0] - mean
            spread = max(st.std, ranked[1][2].std)
            tie = " (within the seed spread: a tie)" if margin <= spread else ""
            text += f", {margin:.3f} ahead of {ranked[1][1]}{tie}"
        return text

    overall = verdict("overall (mean final)", [(r.name, r.mean_final) for r in report.results])
    per_task = [verdict(t, [(r.name, r.final[t]) for r in report.results]) for t in report.tasks]
    return "Lowest final validation loss: " + overall + "; " + "; ".join(per_task) + "."


def legend(report: Report) -> str:
    return (
        "Validation losses are mean ± std over the runs (seeds) of each balancer; *final* is the last "
        "evaluation, *best* the lowest, *mean* their average over tasks. "
        f"*Δ vs {report.baseline}*: relative change of the mean final (and best) loss (negative = better). "
        "*spread final/initial*: max − min across tasks of the final validation loss divided by the "
        "step-0 one (small = tasks converged evenly). "
        f"*tasks rose*: tasks whose final loss is more than {report.tolerance:.0%} above their best "
        "(started to overfit); *rise*: final / best − 1, mean over seeds. *steps/s*: optimizer steps "
        "per second from each run's median time per training step (evaluations excluded); "
        f"*overhead*: extra time per step vs {report.baseline}. Both are *unpaired*: runs that ran at "
        "different times or side by side on a shared machine see different loads, so small differences "
        "mean nothing; measure a balancer's cost side by side (BENCHMARKS.md, balancer overhead)."
        + (
            " *eval score* and *<task> <metric>*: from each run's eval.json (`mtft eval` or "
            "`trainer.eval_at_end`), 0-100, higher is better; the score is the mean over tasks of each "
            "task's first metric."
            if report.eval_columns
            else ""
        )
    )


def write_report(report: Report, out_dir: Path, table: str) -> list[Path]:
    """report.md and the PNG plots into `out_dir`; returns the files written."""
    from mtft.report.plots import plot_val_curves, plot_weights

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
        winners(report),
        "",
        legend(report),
        "",
        "## Task weights: share of the total once they move (± sd over those steps)",
        "",
        weights_table(report),
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
