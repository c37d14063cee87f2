"""Loss balancers, one file each, all behind `mtft.balancers.base.Balancer`."""

from mtft.balancers.base import Balancer, TaskLosses
from mtft.balancers.coba import CoBa
from mtft.balancers.famo import FAMO
from mtft.balancers.gradnorm import GradNorm
from mtft.balancers.uniform import Uniform

__all__ = ["FAMO", "Balancer", "CoBa", "GradNorm", "TaskLosses", "Uniform"]
