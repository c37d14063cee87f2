"""Uniform weighting: every task weighs 1, or a static weight the user gives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtft.balancers.base import Balancer, check_task_names
from mtft.core.schema import positive


@dataclass
class UniformBalancerConfig:
    """Every task weighs 1 (or the static weight you give it): the plain multitask baseline."""

    _target_: str = "mtft.balancers.uniform.Uniform"
    name: str = "uniform"
    # Static weights, task name -> weight; tasks not named get 1.0.
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for task, weight in (self.weights or {}).items():
            positive(f"balancer.weights.{task}", weight)

    def check_tasks(self, tasks: Sequence[str]) -> None:
        check_task_names("balancer.weights", self.weights or {}, tasks)


class Uniform(Balancer):
    config_class = UniformBalancerConfig

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks)
        self.config = self.config_class(**options)
        self.config.check_tasks(self.tasks)
        weights = self.config.weights or {}
        self._weights = torch.tensor([float(weights.get(t, 1.0)) for t in self.tasks])

    def weights(self) -> torch.Tensor:
        return self._weights.clone()
