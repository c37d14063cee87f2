"""`mtft report`: which balancer won and why, from run directories alone.

Runs are grouped by balancer and aggregated over seeds (mean ± std); the result is a Markdown table
(printed and written to `report.md`) and two plots: per-task validation curves and per-task weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtft.commands.exits import fail
from mtft.report.aggregate import build_report
from mtft.report.present import markdown_table, winners, write_report


def run(argv: list[str]) -> int:
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
    try:
        report = build_report(args.paths, args.baseline, args.tolerance)
    except Exception as e:
        return fail(e)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not report.results:
        print("mtft report: no finished runs to compare", file=sys.stderr)
        return 1
    table = markdown_table(report)
    print(table)
    print()
    print(winners(report))
    files = write_report(report, args.out or args.paths[0] / "report", table)
    print("wrote " + ", ".join(map(str, files)), file=sys.stderr)
    return 0
