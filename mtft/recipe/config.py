"""Structured configs: the schema every YAML file in ``mtft/conf/`` is checked against.

Hydra merges each group's YAML onto these dataclasses, so a misspelled key or a value of the wrong
type fails at start-up with a message naming the key, instead of being silently ignored.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import mtft.balancers
from mtft.balancers.base import Balancer
from mtft.core.schema import at_least, refuse_unknown_keys
from mtft.data.config import DataConfig
from mtft.engine.config import DeepSpeedConfig, TrainerConfig
from mtft.eval.config import EvalConfig
from mtft.launch.config import DistributedConfig
from mtft.launch.slurm import register_resolvers
from mtft.loggers.config import LoggerConfig
from mtft.models.config import LoraAdapterConfig, ModelConfig


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    # Polymorphic: each balancer YAML extends its own schema (`uniform_schema`, `coba_schema`, ...).
    balancer: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig | None = None
    peft: LoraAdapterConfig | None = None  # null: full finetuning
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # mtft eval / generate, in-training samples
    seed: int = 0  # model init of the embedded model aside: data order, dropout, balancer state
    # Built datasets and the embedded model are cached here (override with $MTFT_CACHE).
    cache_dir: str = "${oc.env:MTFT_CACHE,'~/.cache/mtft'}"

    def __post_init__(self) -> None:
        at_least("seed", self.seed, 0)


def balancer_schemas() -> dict[str, type]:
    """`<module>_schema` -> the config dataclass of the balancer defined in each mtft.balancers module."""
    schemas = {}
    for module in pkgutil.iter_modules(mtft.balancers.__path__):
        name = f"mtft.balancers.{module.name}"
        for obj in vars(importlib.import_module(name)).values():
            defined_here = isinstance(obj, type) and obj.__module__ == name
            if defined_here and issubclass(obj, Balancer) and "config_class" in vars(obj):
                schemas[f"{module.name}_schema"] = obj.config_class
    return schemas


def register_configs() -> None:
    """Register the schemas as top-level names (no group, so `mtft train --help` lists none of them):
    train.yaml extends `train_schema`, each balancer YAML its own `<name>_schema`. `deepspeed` and
    `peft` need none: their TrainConfig fields are typed."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, schema in balancer_schemas().items():
        cs.store(name=name, node=schema)


def conf_dir() -> Path:
    """The config tree, shipped inside the package (mtft/conf) in a checkout and in the wheel alike."""
    return Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str], config_dir: Path | None = None) -> TrainConfig:
    """The checked TrainConfig `mtft train <overrides>` would run, composed without starting a run (for
    commands that read a run's config, like `mtft data preview`). Hydra errors propagate as they are."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    extra = [f"hydra.searchpath=[file://{config_dir.resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
        cfg = hydra_compose("train", overrides=[*overrides, *extra])
    return to_typed(cfg)


def to_typed(cfg: Any) -> TrainConfig:
    """The composed config as a TrainConfig: every key known to its schema (no silent `+key`), every
    value checked by the dataclasses' `__post_init__`."""
    from omegaconf import OmegaConf

    refuse_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """A config file written by mtft (a run's .hydra/config.yaml, a job's launch config), with
    `key=value` overrides, checked against the schema again (the balancer against its own class's,
    as Hydra's composition did)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    loaded = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
    balancer = loaded.pop("balancer")
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), loaded)
    merged.balancer = OmegaConf.merge(
        OmegaConf.structured(get_class(balancer._target_).config_class), balancer
    )
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
