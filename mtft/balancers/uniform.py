"""Uniform weighting: every task weighs 1, or a static weight the user gives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mtft.balancers.base import Balancer
from mtft.core.errors import MtftError


@dataclass
class UniformBalancerConfig:
    _target_: str = "mtft.balancers.uniform.Uniform"
    # Optional static weights, task name -> weight; tasks not named get 1.0.
    weights: dict[str, float] | None = None


class Uniform(Balancer):
    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise MtftError(f"balancer.weights names unknown task(s) {sorted(unknown)}; tasks: {self.tasks}")
        if any(w <= 0 for w in weights.values()):
            raise MtftError("balancer.weights must be positive")
        self._weights = torch.tensor([float(weights.get(t, 1.0)) for t in self.tasks])

    def weights(self) -> torch.Tensor:
        return self._weights.clone()
