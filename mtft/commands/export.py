"""`mtft export RUN_DIR`: merge a run's LoRA adapter into its base model and save a full model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mtft.commands.exits import fail
from mtft.models.export import export
from mtft.models.loading import DTYPES

log = logging.getLogger("mtft")


def run(argv: list[str]) -> int:
    """`mtft export RUN_DIR [-o OUT]`: print where the merged model went, or a one-line error."""
    parser = argparse.ArgumentParser(
        prog="mtft export",
        description="Merge a LoRA run's adapter (RUN_DIR/model) into its base model and write a full "
        "Hugging Face model + tokenizer, loadable with AutoModelForCausalLM.from_pretrained.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run dir of a peft=lora/qlora run")
    parser.add_argument("-o", "--out", type=Path, metavar="OUT", help="output dir (default: RUN_DIR/merged)")
    parser.add_argument(
        "--base", metavar="PATH_OR_HUB_ID", help="base model (default: the one named in the adapter config)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="dtype to load the base model and save the merged one in (default: the base's own)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        out = export(args.run_dir, args.out, args.base, args.dtype)
    except Exception as e:
        return fail(e)
    print(f"merged {args.run_dir / 'model'} into its base model: {out}", file=sys.stderr)
    return 0
