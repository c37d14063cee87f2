"""A catalogue of bad values for every numeric setting of every schema, through the compose path of
`mtft train`: each is refused before anything is built, with one line naming the key (exit code 2).

The fields are found by walking the schema dataclasses, so a new setting is covered the day it is
added. Overrides are parsed and applied by Hydra's own override code onto the composed defaults of
the section (composing afresh per value would cost half a second each); a sample of the catalogue
runs through the real `mtft train` to pin the exit code and the one-line message.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mtft.core.errors import MtftError, config_error_message
from mtft.core.schema import MAX_INT
from mtft.data.config import TaskConfig
from mtft.recipe.config import TrainConfig, balancer_schemas, conf_dir, register_configs, to_typed
from mtft.recipe.validate import validate

# The config groups a section needs before its keys exist (null sections, polymorphic balancers).
SECTIONS = {
    "deepspeed.": ["deepspeed=zero2"],
    "peft.": ["peft=lora"],
    "data.tasks.t.": ["data=files", "+data.tasks.t.train=[t.jsonl]"],
    **{f"balancer[{name}].": [f"balancer={name}"] for name in ("coba", "famo", "gradnorm", "uniform")},
}
# Zero is a meaningful value here (off, none, or the neutral setting); everywhere else it is refused.
ZERO_OK = {
    "seed",
    "model.build.init_seed",
    "data.num_workers",
    "distributed.max_requeues",
    "eval.temperature",
    "eval.seed",
    "trainer.weight_decay",
    "trainer.adam_beta1",
    "trainer.adam_beta2",
    "trainer.warmup_steps",
    "trainer.early_stopping_min_delta",
    "deepspeed.stage",
    "peft.dropout",
    "balancer[coba].warmup_steps",
    "balancer[famo].gamma",
    "balancer[gradnorm].alpha",
}
INT_BAD = {
    "negative": "-1",
    "NaN": "nan",
    "inf": "inf",
    "huge": str(10**30),
    "fraction": "1.5",
    "text": "abc",
}
FLOAT_BAD = {"negative": "-1", "NaN": "nan", "inf": "-inf", "text": "abc", "list": "[1]"}


def numeric_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted key, int or float) for every numeric field under a schema dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
            kind = args[0]  # Optional[X]
        if dataclasses.is_dataclass(kind):
            yield from numeric_fields(kind, f"{prefix}{f.name}.")
        elif kind in (int, float):
            yield f"{prefix}{f.name}", kind


def catalogue() -> list[tuple[str, type]]:
    fields = [(key, kind) for key, kind in numeric_fields(TrainConfig) if not key.startswith("balancer")]
    for schema, cls in balancer_schemas().items():
        fields += numeric_fields(cls, f"balancer[{schema.removesuffix('_schema')}].")
    return fields + list(numeric_fields(TaskConfig, "data.tasks.t."))


FIELDS = catalogue()
CASES = [
    (key, name, value)
    for key, kind in FIELDS
    for name, value in [
        *(INT_BAD if kind is int else FLOAT_BAD).items(),
        *([] if key in ZERO_OK else [("zero", "0")]),
    ]
]


def section(key: str) -> str:
    return next((prefix for prefix in SECTIONS if key.startswith(prefix)), "")


@pytest.fixture(scope="module")
def composed() -> dict[str, DictConfig]:
    """The composed defaults each section's keys are overridden on, as `mtft train` composes them."""
    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return {prefix: compose("train", overrides=SECTIONS.get(prefix, [])) for prefix in ["", *SECTIONS]}


def refusal(cfg: DictConfig, override: str) -> str | None:
    """The one line `mtft train <override>` prints before building anything, or None if it runs."""
    try:
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides([override]), cfg)
        validate(to_typed(cfg))
    except MtftError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException) as e:
        return config_error_message(e)
    return None


def test_the_catalogue_covers_every_section():
    keys = {key for key, _ in FIELDS}
    assert keys >= ZERO_OK
    assert {"trainer.lr", "data.max_length", "peft.r", "deepspeed.stage", "balancer[coba].tau"} <= keys
    assert {"balancer[famo].lr", "balancer[gradnorm].alpha", "data.tasks.t.val_fraction"} <= keys


@pytest.mark.parametrize("key,name,value", CASES, ids=[f"{k}={n}" for k, n, _ in CASES])
def test_a_bad_value_is_one_line_naming_the_key(composed, key, name, value):
    dotted = re.sub(r"^balancer\[\w+\]\.", "balancer.", key)  # the key as the command line names it
    message = refusal(copy.deepcopy(composed[section(key)]), f"{dotted}={value}")
    assert message is not None, f"{dotted}={value} ({name}) was accepted"
    assert "\n" not in message and dotted.rsplit(".", 1)[-1] in message, message


@pytest.mark.parametrize("key", ["trainer.max_steps", "model.build.init_seed", "peft.r"])
def test_the_largest_integer_is_accepted_and_one_more_is_not(composed, key):
    cfg = composed[section(key)]
    assert refusal(copy.deepcopy(cfg), f"{key}={MAX_INT}") is None
    assert "2147483647" in refusal(copy.deepcopy(cfg), f"{key}={MAX_INT + 1}")


def test_a_huge_float_is_a_valid_setting_left_to_the_nonfinite_guard(composed):
    """lr=1e30 is in range (the guard then skips its non-finite steps; see test_reliability)."""
    assert refusal(copy.deepcopy(composed[""]), "trainer.lr=1e30") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,says",
    [
        ("trainer.max_steps=-1", "trainer.max_steps must be >= 1, got -1"),
        ("trainer.lr=nan", "trainer.lr must be a finite number > 0, got nan"),
        ("trainer.batch_size=many", "trainer.batch_size: Value 'many'"),  # OmegaConf's own type error
        ("+trainer.eval_intervl=1", "unknown key trainer.eval_intervl"),
        ("seed=1e30", "seed"),
    ],
)
def test_the_cli_exits_2_with_one_line(run_mtft, tmp_path, override, says):
    run_dir = tmp_path / "run"
    proc = run_mtft("train", override, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert says in proc.stderr
    assert not run_dir.exists()
