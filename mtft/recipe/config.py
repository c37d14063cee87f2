"""Structured configs: the schema every YAML file in ``mtft/conf/`` is checked against.

Hydra merges each group's YAML onto these dataclasses, so a misspelled key or a value of the wrong
type fails at start-up with a message naming the key, instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mtft.balancers.coba import CobaBalancerConfig
from mtft.balancers.famo import FamoBalancerConfig
from mtft.balancers.gradnorm import GradNormBalancerConfig
from mtft.balancers.uniform import UniformBalancerConfig
from mtft.data.config import DataConfig
from mtft.engine.config import DeepSpeedConfig, TrainerConfig
from mtft.launch.config import DistributedConfig
from mtft.loggers.config import LoggerConfig
from mtft.models.config import LoraAdapterConfig, ModelConfig, QLoraAdapterConfig


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    balancer: Any = MISSING  # instantiated with hydra.utils.instantiate; each balancer has its own schema
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = MISSING
    deepspeed: DeepSpeedConfig | None = None
    peft: Any = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    # Built datasets and the embedded model are cached here (override with $MTFT_CACHE).
    cache_dir: str = "${oc.env:MTFT_CACHE,'~/.cache/mtft'}"


def register_configs() -> None:
    """Register the schemas: train.yaml extends `train_schema`, each balancer YAML its own schema."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # `balancer` is polymorphic (Any above), so each balancer's YAML extends its own schema.
    cs.store(group="schema/balancer", name="uniform", node=UniformBalancerConfig)
    cs.store(group="schema/balancer", name="coba", node=CobaBalancerConfig)
    cs.store(group="schema/balancer", name="famo", node=FamoBalancerConfig)
    cs.store(group="schema/balancer", name="gradnorm", node=GradNormBalancerConfig)
    cs.store(group="schema", name="deepspeed", node=DeepSpeedConfig)
    cs.store(group="schema/peft", name="lora", node=LoraAdapterConfig)
    cs.store(group="schema/peft", name="qlora", node=QLoraAdapterConfig)


def conf_dir() -> Path:
    """The config tree, shipped inside the package (mtft/conf) in a checkout and in the wheel alike."""
    return Path(__file__).resolve().parent.parent / "conf"
