"""Loss balancers, one file each, all behind `mtft.balancers.base.Balancer`."""

from mtft.balancers.base import Balancer, TaskLosses
from mtft.balancers.uniform import Uniform

__all__ = ["Balancer", "TaskLosses", "Uniform"]
