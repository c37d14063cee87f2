"""`mtft data preview`: the task mixture as the model will see it, before a GPU hour is spent on it.

Per task: how many records were read, held out, capped and truncated, sequence length percentiles and
the share of learned tokens; then a few training examples rendered as the model gets them, with the
learned tokens highlighted (on a terminal) or wrapped in [[ ]] (elsewhere), so a masking mistake is seen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mtft.commands.exits import fail
from mtft.core.errors import MtftError
from mtft.data.collator import IGNORE_INDEX
from mtft.data.prepared import Data
from mtft.recipe.builders import build_data
from mtft.recipe.config import compose
from mtft.recipe.validate import validate

LEARNED_STYLE, GIVEN_STYLE = "bold green", "dim"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mtft data preview",
        description="Read and tokenize the task mixture of `mtft train <overrides>` and show it: counts, "
        "lengths, and examples as the model sees them (learned tokens highlighted). Trains nothing.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, as for mtft train (e.g. data=mytasks)"
    )
    parser.add_argument("-n", "--examples", type=int, default=1, help="examples shown per task (default 1)")
    parser.add_argument("--task", action="append", help="show only this task's examples (repeatable)")
    parser.add_argument("--config-dir", type=Path, help="your config dir, as for mtft train --config-dir")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.overrides, args.config_dir)
        validate(cfg)
        unknown = sorted(set(args.task or ()) - set(cfg.data.tasks))
        if unknown:
            raise MtftError(f"--task {unknown[0]}: not a task of this mixture ({', '.join(cfg.data.tasks)})")
        data = build_data(cfg)
    except Exception as e:
        return fail(e)
    console = Console() if sys.stdout.isatty() else Console(width=160)  # whole table in logs and pipes
    console.print(summary_table(data, cfg.data.max_length))
    for task_id, task in enumerate(data.tasks):
        if args.task and task not in args.task:
            continue
        rows = np.flatnonzero(task_ids(data) == task_id)[: args.examples]
        for row in rows.tolist():
            console.rule(f"{task} · train row {row}")
            console.print(render(data, data.mixture.train[row], console.is_terminal))
    if not console.is_terminal:
        console.print("(learned tokens are shown in [[ ]])", markup=False)
    return 0


def task_ids(data: Data) -> np.ndarray:
    return np.asarray(data.mixture.train.with_format("arrow")[:]["task_id"])


def summary_table(data: Data, max_length: int) -> Table:
    """Per task: records and what became of them, token length percentiles, share of learned tokens."""
    table = Table(title=f"mixture (data.max_length={max_length})")
    for column in (
        "task",
        "read",
        "train",
        "val",
        "held out",
        "capped",
        "truncated",
        "tokens p50/p90/p99/max",
        "learned",
    ):
        table.add_column(column, justify="left" if column == "task" else "right")
    arrow = data.mixture.train.with_format("arrow")[:]
    lengths = np.asarray(pc.list_value_length(arrow["input_ids"]))
    flat = np.asarray(pc.list_flatten(arrow["labels"]))
    parents = np.asarray(pc.list_parent_indices(arrow["labels"]))
    learned = np.bincount(parents, weights=flat != IGNORE_INDEX, minlength=len(lengths))
    ids = np.asarray(arrow["task_id"])
    counts = data.conversations.counts if data.conversations else {}
    for task_id, task in enumerate(data.tasks):
        mine = ids == task_id
        p50, p90, p99 = np.percentile(lengths[mine], [50, 90, 99]).round().astype(int)
        count = counts.get(task)
        table.add_row(
            task,
            str(count.read) if count else "",
            str(int(mine.sum())),
            str(len(data.mixture.val_rows[task_id])),
            str(count.held_out) if count else "",
            str(count.capped) if count else "",
            str(data.mixture.truncated[task_id]),
            f"{p50}/{p90}/{p99}/{lengths[mine].max()}",
            f"{learned[mine].sum() / lengths[mine].sum():.0%}",
        )
    return table


def render(data: Data, row: dict, styled: bool) -> Text:
    """The row's tokens decoded run by run: learned runs highlighted (or in [[ ]]), the rest dimmed."""
    text = Text()
    ids, labels = row["input_ids"], row["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and (labels[i] != IGNORE_INDEX) == (labels[start] != IGNORE_INDEX):
            continue
        piece = data.tokenizer.decode(ids[start:i], skip_special_tokens=False)
        is_learned = labels[start] != IGNORE_INDEX
        if styled:
            text.append(piece, style=LEARNED_STYLE if is_learned else GIVEN_STYLE)
        else:
            text.append(f"[[{piece}]]" if is_learned else piece)
        start = i
    return text
