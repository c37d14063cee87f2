"""The rules that involve more than one config section, checked before anything is built.

Each dataclass checks its own fields in `__post_init__` (run by `OmegaConf.to_object`); what is left
here needs two sections at once, or the machine. `mtft train` calls `validate` before any data,
model, engine or W&B run exists, so a bad config fails in about a second with one line.
"""

from __future__ import annotations

from hydra.utils import get_class

from mtft.core.errors import MtftError
from mtft.models.adapters import check_adapter_support
from mtft.recipe.config import TrainConfig


def validate(cfg: TrainConfig) -> None:
    """Raise MtftError naming the keys of the first rule `cfg` breaks."""
    if not cfg.data.tasks:
        raise MtftError("the mixture has no tasks: set data.tasks (see mtft/conf/data/jsonl.yaml)")
    balancer = get_class(cfg.balancer._target_)
    if cfg.deepspeed is not None and balancer.needs_parameters:
        raise MtftError(
            f"balancer {cfg.balancer.name} takes per-task gradients of shared parameters "
            "(torch.autograd.grad), which DeepSpeed's ZeRO gradient hooks do not allow; run it without "
            "DeepSpeed (deepspeed=none, plain or DDP with distributed.nproc_per_node)"
        )
    check_tasks = getattr(cfg.balancer, "check_tasks", None)
    if check_tasks is not None:
        check_tasks(list(cfg.data.tasks))
    check_adapter_support(cfg.peft)
