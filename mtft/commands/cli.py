"""The `mtft` command: a thin dispatcher to sub-commands; `mtft train` is a Hydra app."""

from __future__ import annotations

import importlib
import os
import signal
import sys

from mtft import __version__

COMMANDS = {
    "train": "train a model on a task mixture with a loss balancer (Hydra overrides; see `mtft train --help`)",
    "report": "compare runs (e.g. a balancer sweep): Markdown table + per-task plots (see `mtft report --help`)",
    "export": "merge a LoRA run's adapter into its base model: a full model dir (see `mtft export --help`)",
    "eval": "per-task loss and generation metrics of a run (or base model): eval.json (see `mtft eval --help`)",
    "generate": "answer prompts with a run's model and chat template (see `mtft generate --help`)",
    "data": "`mtft data preview [overrides]`: the mixture as the model sees it, learned tokens marked",
}

USAGE = """usage: mtft <command> [args...]

Multitask finetuning of causal language models with loss balancers.

commands:
{commands}

examples:
  mtft train                                   the embedded default: tiny model on codetasks, offline
  mtft train balancer=uniform trainer.max_steps=100 seed=1
  mtft train -m balancer=uniform seed=1,2,3    Hydra multirun, one job dir each
  mtft train --help                            config groups and options
  mtft report multirun/2026-11-24/12-00-00     compare a sweep's balancers: table + plots
  mtft export outputs/2026-11-24/12-00-00      merge a peft=lora run's adapter: <run dir>/merged
  mtft eval outputs/2026-11-24/12-00-00        per-task loss, perplexity, metrics: <run dir>/eval.json
  mtft generate outputs/2026-11-24/12-00-00 --prompt "def add(a, b):"
  mtft data preview data=mytasks -n 2          counts, lengths and 2 examples per task, before training
"""


# Each command's module (in this package) and its `run(args) -> exit code`, imported only when used.
RUNNERS = {
    "train": "train",
    "report": "report",
    "export": "export",
    "eval": "eval",
    "generate": "generate",
    "data preview": "preview",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; its exit status."""
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (`mtft --help | head -1`): stop quietly, as `cat` would. Pointing
        # stdout at /dev/null keeps the interpreter's final flush from raising a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(args: list[str]) -> int:
    # The `deepspeed` launcher passes --local_rank=N (also in $LOCAL_RANK), which Hydra would reject.
    args = [a for a in args if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"mtft {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "data" and rest[:1] == ["preview"]:
        command, rest = "data preview", rest[1:]
    if command in RUNNERS:
        module = importlib.import_module(f"mtft.commands.{RUNNERS[command]}")
        return module.run(rest)
    if command == "data":
        print("usage: mtft data preview [overrides...] (see `mtft data preview --help`)", file=sys.stderr)
        return 2
    print(f"mtft: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
