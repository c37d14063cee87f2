"""`mtft generate TARGET --prompt TEXT | --file prompts.jsonl`: answers from a run's model, each prompt
rendered with the run's chat template (or plain format) exactly as training rendered its prompts.

`--task NAME` asks as that task's examples did: its system prompt (when all its examples share one)
and the text every one of its prompts starts and ends with (the task's instruction, e.g.
"# name the function ___" ... "# name:" for codetasks' function_naming) go around the given text.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from mtft.commands.exits import fail
from mtft.commands.target import load_eval_model, resolve_target
from mtft.core.errors import MtftError
from mtft.recipe.config import TrainConfig


def read_prompts(path: Path) -> list[str]:
    """The `prompt` of each line of a JSONL file; a malformed line is an error naming file:line."""
    if not path.is_file():
        raise MtftError(f"--file {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise MtftError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise MtftError(f'{path}:{number}: expected an object with a "prompt" string, got {line[:60]}')
        prompts.append(record["prompt"])
    if not prompts:
        raise MtftError(f"{path}: no prompts in it")
    return prompts


def task_frame(conversations) -> tuple[str | None, str, str]:
    """(shared system prompt or None, text before, text after the variable part) of a task's prompts,
    cut at line boundaries so no part of an example's own first or last line is kept."""
    rows = conversations.select(range(min(len(conversations), 200)))
    users = [row["contents"][row["roles"].index("user")] for row in rows if "user" in row["roles"]]
    systems = {row["contents"][0] if row["roles"][0] == "system" else None for row in rows}
    prefix = os.path.commonprefix(users)
    prefix = prefix[: prefix.rfind("\n") + 1]
    suffix = os.path.commonprefix([u[len(prefix) :][::-1] for u in users])[::-1]
    suffix = suffix[suffix.find("\n") :] if "\n" in suffix else ""
    return (systems.pop() if len(systems) == 1 else None), prefix, suffix


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mtft generate",
        description="Answer prompts with a run's model (or a model dir / Hub id), using its chat template.",
    )
    parser.add_argument("target", metavar="TARGET", help="a run dir, a model dir or a Hub id (org/name)")
    parser.add_argument("overrides", nargs="*", help="config overrides (for a model dir or Hub id)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the answer is printed")
    source.add_argument("--file", type=Path, help='JSONL, one {"prompt": ...} per line; prints JSONL answers')
    parser.add_argument("--task", help="format each prompt as this task's examples were")
    parser.add_argument("--temperature", type=float, help="0: greedy (default: eval.temperature)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling (default: eval.top_p)")
    parser.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens")
    parser.add_argument("--seed", type=int, help="for sampling (default: eval.seed)")
    args = parser.parse_intermixed_args(argv)
    try:
        prompts = read_prompts(args.file) if args.file else [args.prompt]
        target = resolve_target(args.target, args.overrides)
        cfg = target.cfg
        if args.task is not None and args.task not in cfg.data.tasks:
            raise MtftError(f"--task {args.task}: not a task of this run ({', '.join(cfg.data.tasks)})")
        options = {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
        }
        cfg.eval = replace(cfg.eval, **{k: v for k, v in options.items() if v is not None})  # checks again
        answers = generate_answers(cfg, prompts, args.task)
    except Exception as e:
        return fail(e)
    if args.file:
        for prompt, answer in zip(prompts, answers, strict=True):
            print(json.dumps({"prompt": prompt, "completion": answer}, ensure_ascii=False))
    else:
        print(answers[0])
    return 0


def generate_answers(cfg: TrainConfig, prompts: list[str], task: str | None) -> list[str]:
    """Render, tokenize and answer `prompts` (a `TrainConfig` whose model.name_or_path is the model)."""
    import datasets
    import transformers

    from mtft.core.dist import device_for_rank
    from mtft.data.encode import Encoder
    from mtft.data.templates import resolve_template
    from mtft.eval.generate import Prompt, generate
    from mtft.models.config import PromptFormat
    from mtft.models.loading import load_tokenizer
    from mtft.recipe.builders import build_data

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    system, prefix, suffix = None, "", ""
    if task is not None:
        data = build_data(cfg)
        tokenizer, template = data.tokenizer, data.template
        assert data.conversations is not None
        system, prefix, suffix = task_frame(data.conversations.validation[task])
    else:
        tokenizer = load_tokenizer(str(cfg.model.name_or_path), cfg.model)
        chat = cfg.model.prompt_format == PromptFormat.chat
        template = resolve_template(cfg.model.chat_template, tokenizer) if chat else None
    encoder = Encoder(tokenizer, cfg.data.max_length, template)
    head = [("system", system)] if system is not None and template is not None else []
    rendered = []
    for text in prompts:
        roles, contents = zip(*[*head, ("user", prefix + text + suffix), ("assistant", "")], strict=True)
        ids, end = encoder.prompt(list(roles), list(contents))
        rendered.append(Prompt(ids, end=end))
    model = load_eval_model(cfg, device_for_rank())
    return generate(model, tokenizer, rendered, cfg.eval)
