"""Every file of the config tree composes and passes the schema, and users can add their own.

`conf/` ships in the wheel, so a file that only breaks when it is chosen (a typo in a key, a wrong
type, an override of a group that does not exist) would reach users: each option of each group and
each experiment is composed here with Hydra's compose API and converted with `OmegaConf.to_object`,
which checks it against the dataclasses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtft.recipe.config import conf_dir

from conftest import compose_train

CONF = conf_dir()
# Options that leave a mandatory value (???) to the user, with one they would give.
NEEDS = {
    "model/hf": ["model.name_or_path=/models/any"],
    "deepspeed/file": ["deepspeed.config_file=/configs/ds.json"],
}
OPTIONS = sorted(
    f"{path.parent.relative_to(CONF).as_posix()}/{path.stem}"
    for path in CONF.rglob("*.yaml")
    if path.parent != CONF
)


def test_every_group_has_options() -> None:
    groups = {option.rsplit("/", 1)[0] for option in OPTIONS}
    assert {"model", "data", "balancer", "deepspeed", "peft", "logger", "experiment"} <= groups


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_file_composes_against_the_schema(option: str) -> None:
    group, name = option.rsplit("/", 1)
    typed = compose_train([f"{group}={name}", *NEEDS.get(option, [])])
    if group == "experiment":
        assert typed.trainer.max_steps > 0


def test_experiments_are_global_and_open_with_their_command() -> None:
    """Each experiment sets keys of the whole config, and its command is in its first lines."""
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path.name
        assert f"experiment={path.stem}" in lines[1], path.name


def test_a_users_config_dir_adds_experiments_and_options(run_mtft, tmp_path: Path) -> None:
    """`mtft train --config-dir DIR`, run from elsewhere: the user's own experiment and data option
    sit beside the shipped ones, and can use them (here the shipped files and coba_tiny)."""
    user = tmp_path / "my_conf"
    (user / "experiment").mkdir(parents=True)
    (user / "data").mkdir()
    (user / "data" / "mine.yaml").write_text(
        "defaults:\n  - files\n  - _self_\n\ntasks:\n  qa:\n    train: [/data/qa.jsonl]\n"
    )
    (user / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /balancer: coba_tiny\n  - override /data: mine\n\n"
        "trainer:\n  max_steps: 7\n"
    )
    proc = run_mtft("train", "--config-dir", str(user), "experiment=mine", "--cfg", "job", cwd=tmp_path)
    job = OmegaConf.create(proc.stdout)
    assert job.trainer.max_steps == 7 and job.balancer.warmup_steps == 25
    assert job.data.source == "files" and list(job.data.tasks) == ["qa"]
    shipped = run_mtft(
        "train", "--config-dir", str(user), "experiment=coba_tiny", "--cfg", "job", cwd=tmp_path
    )
    assert OmegaConf.create(shipped.stdout).balancer.history_length == 6
