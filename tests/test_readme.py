"""Every `mtft ...` command in the fenced shell blocks of README.md and docs/*.md works as written.

- `mtft train ...` (also after `torchrun ... -m`, `deepspeed ... --module`, `srun`) is composed
  in-process exactly as `mtft train ... --cfg job` would compose it, then turned into the typed
  `TrainConfig` (and validated, where the schema offers `validate`). A multirun (`-m`) is expanded like
  Hydra's basic sweeper does (the command line's sweeps plus `hydra.sweeper.params`) and every job is
  composed, so an invalid override in any job fails.
- `mtft report ...` / `mtft export ...` go through the command's real argument parser, which stops
  the command before it touches any file; `mtft data preview ...` too, and its overrides are composed
  like a `mtft train`'s.
- Placeholders: a bare `...` token ("and more overrides") is dropped, and `<...>` placeholders are
  replaced by the values in PLACEHOLDERS; an unknown placeholder fails the test, so add it there.
  A command that cannot be checked here (it needs the user's own files) carries the comment
  `# not checked: <why>`.
- Every relative link of those pages points at a file of the repository (and a heading, for `#...`).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from mtft.commands import cli
from mtft.recipe import config as schema
from mtft.recipe.config import conf_dir, register_configs, to_typed

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
NOT_CHECKED = "# not checked"
PLACEHOLDERS = {
    "<date>": "2026-11-25",
    "<time>": "04-20-00",
    "<task>": "sql",
    "<partition>": "gpu",
    "<commit>": "0123abc",
}
LAUNCHERS = ("torchrun", "deepspeed", "srun", "python", "python3")


def shell_commands(path: Path) -> list[str]:
    """The command lines of the file's fenced shell blocks, continuation lines joined."""
    commands, lang, pending = [], None, ""
    for line in path.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in SHELL_BLOCKS:
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending:
            commands.append(pending)
        pending = ""
    return commands


def mtft_argv(line: str) -> list[str] | None:
    """The arguments after `mtft` in a command line, or None if the line does not run mtft."""
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0].endswith("mtft"):
        return words[1:]
    if words[0] in LAUNCHERS:
        for i, word in enumerate(words[:-1]):
            if word == "mtft" and (words[i - 1] in ("-m", "--module") or words[0] == "srun"):
                return words[i + 1 :]
    return None


def substitute(arg: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        arg = arg.replace(placeholder, value)
    assert not re.search(r"<[^<>]+>", arg), f"unknown placeholder in {arg!r}: add it to PLACEHOLDERS"
    return arg


def collect() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in shell_commands(path):
            argv = mtft_argv(line)
            if argv is not None and NOT_CHECKED not in line:
                found.append(
                    (f"{path.relative_to(ROOT)}: {line}", [substitute(a) for a in argv if a != "..."])
                )
    return found


COMMANDS = collect()


def compose_job(overrides: list[str]):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def check_job(overrides: list[str]) -> None:
    cfg = compose_job(overrides)
    launcher = cfg.hydra.launcher
    OmegaConf.to_container(launcher, resolve=True)  # e.g. the SLURM launcher's ${distributed.*}
    with open_dict(cfg):
        del cfg["hydra"]
    typed = to_typed(cfg)
    validate = getattr(schema, "validate", None)
    if validate is not None:
        validate(typed)


def check_train(args: list[str]) -> None:
    multirun = any(a in ("-m", "--multirun") for a in args)
    flags_with_value = {"--cfg", "-c", "--package", "-p"}
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags_with_value:
            skip = True
        elif arg.startswith("-"):
            assert arg in ("-m", "--multirun", "--help", "-h", "--resolve"), f"unsupported flag {arg}"
        else:
            overrides.append(arg)
    if not multirun:
        check_job(overrides)
        return
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweep = {o.get_key_element(): o.input_line for o in parsed if o.is_sweep_override()}
    params = compose_job(fixed).hydra.sweeper.params or {}
    for key, value in params.items():  # the config's sweep, unless the command line sweeps the key
        if key not in sweep and not any(o.get_key_element() == key for o in parsed):
            sweep[key] = f"{key}={value}"
    jobs = [job for batch in BasicSweeper.split_arguments(parsed_lines(sweep), None) for job in batch]
    assert jobs, "the sweep has no jobs"
    for job in jobs:
        check_job(fixed + list(job))


def parsed_lines(sweep: dict[str, str]):
    return OverridesParser.create().parse_overrides(list(sweep.values()))


class Parsed(Exception):
    pass


def check_argparse(monkeypatch, command: str, args: list[str]) -> None:
    """Run the sub-command's own parser on args; stop right after it accepted them."""
    for name in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, name)

        def parse_then_stop(self, argv=None, namespace=None, original=original):
            original(self, argv, namespace)
            raise Parsed

        monkeypatch.setattr(argparse.ArgumentParser, name, parse_then_stop)
    with pytest.raises(Parsed):
        cli.main([command, *args])


def test_the_docs_have_commands():
    assert len(COMMANDS) > 20
    assert {"train", "report", "export"} <= {argv[0] for _, argv in COMMANDS if argv}


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_works_as_written(where, argv, monkeypatch, capsys):
    register_configs()
    if not argv or argv[0] in ("--help", "-h", "--version", "-V"):
        assert cli.main(argv) == 0
    elif argv[0] == "train":
        check_train(argv[1:])
    elif argv[0] in ("report", "export"):
        if argv[1:] in ([], ["--help"], ["-h"]):
            with pytest.raises(SystemExit) as exit_:
                cli.main(argv)
            assert exit_.value.code == 0
        else:
            check_argparse(monkeypatch, argv[0], argv[1:])
    elif argv[0] in ("eval", "generate"):
        check_argparse(monkeypatch, argv[0], argv[1:])
        check_job([a for a in argv[2:] if "=" in a and not a.startswith("-")])
    elif argv[:2] == ["data", "preview"]:
        check_argparse(monkeypatch, "data", argv[1:])
        with_value = {"-n", "--examples", "--task", "--config-dir"}
        overrides = [
            a for i, a in enumerate(argv[2:]) if not a.startswith("-") and argv[1 + i] not in with_value
        ]
        check_job(overrides)
    else:
        pytest.fail(f"unknown mtft command in {where}")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_point_into_the_repo(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name} links to {target}, which the repository lacks"
        assert ROOT in linked.parents or linked == ROOT, f"{path.name} links outside the repository: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name} links to a missing heading: {target}"


# --- overrides quoted inline in the prose ----------------------------------------------------------

KEYS = r"[+~]{0,2}(?:model|data|balancer|trainer|logger|deepspeed|peft|distributed|seed|experiment|hydra)"
# `key=value`, or `'key=value with spaces'` quoted as for the shell.
INLINE = re.compile(rf"`({KEYS}[\w.<>/-]*=[^`\s]*)`|`'({KEYS}[\w.<>/-]*=[^`']*)'`")
# Shown as placeholders, not as something to run: `<task>`, `N`, `PATH`, `a|b`, `...`, a bare `key=`.
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\||=$|=(N|PATH|DIR|w)$")
# The inline examples of what is refused (docs/resuming.md's table of bad input, the README's typo).
REFUSED = {
    "trainer.mx_steps=5",
    "trainer.max_steps=many",
    "trainer.lr=-1",
    "trainer.log_interval=0",
    "trainer.precision=fp16",
}
# What an override needs beside it to compose: its section's config group, or a task to read.
CONTEXT = {
    "+balancer.min_losses.": ["balancer=famo"],
    "balancer.post_step_loss=": ["balancer=famo"],
    "balancer.probe_rows=": ["balancer=coba"],
    "+deepspeed.extra=": ["deepspeed=zero2"],
    "peft.": ["peft=lora"],
    "trainer.pure_bf16=": ["trainer.precision=bf16"],
    "model.chat_template=": ["model.prompt_format=chat"],
    "data=files": ["+data.tasks.t.train=[README.md]"],
}


def inline_overrides() -> list[tuple[str, str]]:
    found = {}
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for plain, quoted in INLINE.findall(text):
            override = plain or quoted
            if not PLACEHOLDER.search(override):
                found.setdefault(override, str(path.relative_to(ROOT)))
    return sorted((where, override) for override, where in found.items())


INLINE_OVERRIDES = inline_overrides()


def test_the_docs_quote_overrides_inline():
    assert len(INLINE_OVERRIDES) > 30 and {o for _, o in INLINE_OVERRIDES} >= REFUSED


@pytest.mark.parametrize("where,override", INLINE_OVERRIDES, ids=[o for _, o in INLINE_OVERRIDES])
def test_an_inline_override_composes_as_written(where, override):
    register_configs()
    context = next((extra for prefix, extra in CONTEXT.items() if override.startswith(prefix)), [])
    if override in REFUSED:
        with pytest.raises(Exception):  # noqa: B017 - Hydra's, OmegaConf's or mtft's own error
            check_job([*context, override])
    else:
        check_job([*context, override])


# --- the one table of config groups -----------------------------------------------------------------

HYDRA_OWN_OPTIONS = {"hydra/launcher": {"joblib"}}  # Hydra's plugins, not files of mtft/conf


def config_group_rows(path: Path, end: str) -> dict[str, set[str]]:
    """group -> the backticked names in its table row's second cell, in the section `## Config groups`."""
    text = path.read_text()
    section = text[text.index("## Config groups") :]
    section = section[: section.index(end)]
    rows = re.findall(r"^\| `([\w/]+)` \| ([^|]*) \|", section, flags=re.M)
    return {group: set(re.findall(r"`(\w+)`", cell)) for group, cell in rows}


def test_the_config_group_table_lists_every_option_file():
    """docs/configuration.md's table names every group of mtft/conf and every option file in it, and
    nothing else; the README's short table names only groups and defaults that exist."""
    conf = Path(conf_dir())
    tree = {
        d.name: {f.stem for f in d.glob("*.yaml")} for d in conf.iterdir() if d.is_dir() and d.name != "hydra"
    }
    tree["hydra/launcher"] = {f.stem for f in (conf / "hydra" / "launcher").glob("*.yaml")}
    table = config_group_rows(ROOT / "docs" / "configuration.md", "Keys users change most")
    assert set(table) == set(tree)
    for group, options in tree.items():
        assert table[group] == options | HYDRA_OWN_OPTIONS.get(group, set()), group
    readme = config_group_rows(ROOT / "README.md", "\n## ")  # group | default | what it chooses
    assert readme and set(readme) <= set(tree)
    for group, defaults in readme.items():
        assert defaults <= tree[group], group
