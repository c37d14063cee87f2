"""Loss balancers, one module each (the class and its config dataclass), all behind
`mtft.balancers.base.Balancer`. A new balancer is a module here plus its YAML in mtft/conf/balancer/:
`register_configs` finds its config by scanning this package."""

from mtft.balancers.base import Balancer, TaskLosses

__all__ = ["Balancer", "TaskLosses"]
