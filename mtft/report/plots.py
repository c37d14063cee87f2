"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Colors follow the table's row order, so a balancer has the same color in every plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtft.report.aggregate import Report, val_curve, weight_curve


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 2) if n <= 4 else 3
    return math.ceil(n / cols), cols


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_val_curves(report: Report, path: Path) -> Path:
    """One subplot per task, one line per balancer (mean over seeds, band = min..max)."""
    val_curves_figure(report).savefig(path, dpi=110)
    return path


def val_curves_figure(report: Report) -> Figure:
    """The validation-curve plot: zoomed in below the step-0 loss when curves have 3+ evaluations."""
    rows, cols = _grid(len(report.tasks))
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, task in zip(axes, report.tasks, strict=False):
        later: list[float] = []  # values after the first evaluation: they set the zoom
        lows: list[float] = []
        few = False  # a curve of one or two points: nothing to zoom into
        for i, res in enumerate(report.results):
            steps, mean, low, high = val_curve(res, task)
            if not steps:
                continue
            ax.plot(steps, mean, color=_color(i), label=res.name, marker="o" if len(steps) < 8 else ".")
            if len(res.runs) > 1:
                ax.fill_between(steps, low, high, color=_color(i), alpha=0.15, linewidth=0)
            later += high[1:]
            lows += low
            few = few or len(steps) < 3
        if later and not few:  # zoom past the step-0 loss, which would flatten the differences that matter
            span = max(max(later) - min(lows), 1e-3 * abs(max(later)), 1e-6)
            ax.set_ylim(min(lows) - 0.03 * span, max(later) + 0.05 * span)
        ax.set_title(task)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    for ax in axes[len(report.tasks) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(
        "Validation loss per task (mean over seeds, band: min–max; zoomed in below the step-0 loss "
        "when there are three or more evaluations)"
    )
    return fig


def plot_weights(report: Report, path: Path) -> Path:
    """One subplot per balancer, one line per task: weights normalized to sum 1 at every step.

    Balancers log weights on different scales (uniform: 1 per task, CoBa and FAMO: sum 1,
    GradNorm: sum T); normalizing makes them comparable, and the loss only sees the ratios anyway.
    """
    rows, cols = _grid(len(report.results))
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, res in zip(axes, report.results, strict=False):
        for j, task in enumerate(report.tasks):
            steps, mean, _, _ = weight_curve(res, task)
            ax.plot(steps, mean, color=_color(j), label=task, linewidth=1.2)
        ax.axhline(1 / len(report.tasks), color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{res.name} ({len(res.runs)} run{'s' if len(res.runs) != 1 else ''})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("weight / sum of weights")
        ax.grid(alpha=0.3)
    for ax in axes[len(report.results) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle("Task weights over time, normalized to sum 1 per step (mean over seeds; dotted: equal)")
    fig.savefig(path, dpi=110)
    return path
