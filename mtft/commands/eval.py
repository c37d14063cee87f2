"""`mtft eval TARGET [overrides]`: per-task loss, perplexity and generation metrics of a run's model
(or a base model: the before-finetuning baseline), written to eval.json + eval_samples.jsonl."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mtft.commands.exits import fail
from mtft.commands.target import Target, load_eval_model, resolve_target
from mtft.core.errors import MtftError
from mtft.core.schema import at_least

log = logging.getLogger("mtft")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mtft eval",
        description="Evaluate a run's model on its tasks' validation sets: token loss and perplexity, and "
        "each task's generation metrics (data.tasks.NAME.metrics). Writes eval.json and "
        "eval_samples.jsonl and prints a table.",
    )
    parser.add_argument(
        "target", metavar="TARGET", help="a run dir, a model dir (e.g. RUN/merged) or a Hub id (org/name)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.batch_size=32 data=mytasks")
    parser.add_argument(
        "--max-samples", type=int, help="the first N validation examples per task (default all)"
    )
    parser.add_argument("--task", action="append", help="evaluate only this task (repeatable)")
    parser.add_argument("-o", "--out", type=Path, metavar="DIR", help="output dir (default: the run dir)")
    parser.add_argument("--config-dir", type=Path, help="your config dir, for a model dir or Hub id")
    args = parser.parse_intermixed_args(argv)
    try:
        target = resolve_target(args.target, args.overrides, args.config_dir)
        cfg = target.cfg
        if args.max_samples is not None:
            at_least("--max-samples", args.max_samples, 1)
            cfg.eval.max_samples = args.max_samples
        unknown = sorted(set(args.task or ()) - set(cfg.data.tasks))
        if unknown:
            raise MtftError(f"--task {unknown[0]}: not a task of this run ({', '.join(cfg.data.tasks)})")
        out = args.out or target.run_dir
        if out is None:
            raise MtftError("-o/--out DIR is needed when TARGET is not a run dir (where eval.json goes)")
        dist = cfg.distributed
        if "RANK" not in os.environ and dist.nproc_per_node * dist.nnodes > 1:
            from mtft.launch.workers import launch_command

            launch_command(dist, ["-m", "mtft", "eval", *argv], out.name)
            return 0
        _evaluate(target, out, args.task)
    except Exception as e:
        return fail(e)
    return 0


def _evaluate(target: Target, out: Path, tasks: list[str] | None) -> None:
    """Build the data and model, evaluate (this rank's share), and on rank 0 write and print."""
    import datasets
    import transformers

    from mtft.core.dist import device_for_rank, rank, rank_zero_first
    from mtft.eval.evaluate import evaluate, print_table, write_eval
    from mtft.launch.process_group import join_process_group
    from mtft.recipe.builders import build_data

    cfg = target.cfg
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    join_process_group(cfg.distributed.backend, cfg.distributed.timeout_min)
    device = device_for_rank()
    with rank_zero_first():
        data = build_data(cfg)
    model = load_eval_model(cfg, device)
    result, samples = evaluate(model, data, cfg.data, cfg.eval, target.label, tasks=tasks)
    if rank() == 0:
        files = write_eval(out, result, samples)
        print_table(result)
        print("wrote " + ", ".join(map(str, files)), file=sys.stderr)
