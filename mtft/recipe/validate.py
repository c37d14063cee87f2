"""The rules that involve more than one config section, checked before anything is built.

Each dataclass checks its own fields in `__post_init__` (run by `OmegaConf.to_object`); what is left
here needs two sections at once, or the machine. `mtft train` calls `validate` before any data,
model, engine or W&B run exists, so a bad config fails in about a second with one line.
"""

from __future__ import annotations

import importlib.util

import torch
from hydra.utils import get_class

from mtft.core.errors import MtftError
from mtft.models.config import LoraAdapterConfig, PeftMethod
from mtft.recipe.config import TrainConfig


def validate(cfg: TrainConfig) -> None:
    """Raise MtftError naming the keys of the first rule `cfg` breaks."""
    if not cfg.data.tasks:
        raise MtftError("the mixture has no tasks: set data.tasks (see mtft/conf/data/files.yaml)")
    balancer = get_class(cfg.balancer._target_)
    if cfg.deepspeed is not None and balancer.needs_parameters:
        raise MtftError(
            f"balancer {cfg.balancer.name} takes per-task gradients of shared parameters "
            "(torch.autograd.grad), which DeepSpeed's ZeRO gradient hooks do not allow; run it without "
            "DeepSpeed (deepspeed=none, plain or DDP with distributed.nproc_per_node)"
        )
    if cfg.deepspeed is not None and cfg.trainer.pure_bf16:
        raise MtftError(
            "trainer.pure_bf16=true applies to the plain PyTorch engine; DeepSpeed keeps its own float32 "
            "master weights (drop trainer.pure_bf16, or use deepspeed=none)"
        )
    if cfg.deepspeed is not None and cfg.trainer.compile:
        raise MtftError(
            "trainer.compile=true applies to the plain PyTorch engine (one process or DDP); DeepSpeed "
            "wraps the model in its own engine (drop trainer.compile, or use deepspeed=none)"
        )
    generating = cfg.trainer.sample_interval is not None or cfg.trainer.eval_at_end
    if generating and cfg.deepspeed is not None and cfg.deepspeed.stage == 3:
        raise MtftError(
            "trainer.sample_interval and trainer.eval_at_end generate with the model in one piece, which "
            "ZeRO-3 shards across ranks; run `mtft eval RUN_DIR` on the saved model instead"
        )
    check_tasks = getattr(cfg.balancer, "check_tasks", None)
    if check_tasks is not None:
        check_tasks(list(cfg.data.tasks))
    check_adapter_support(cfg.peft)


def check_adapter_support(cfg: LoraAdapterConfig | None) -> None:
    """Stop at once when the chosen PEFT method cannot run on this machine, saying what would."""
    if cfg is None or cfg.method != PeftMethod.qlora:
        return
    if not torch.cuda.is_available():
        raise MtftError(
            "peft=qlora needs a CUDA GPU: bitsandbytes' 4-bit (NF4) quantization runs on CUDA, and "
            "no GPU is visible here (torch.cuda.is_available() is False). Use peft=lora to train "
            "LoRA adapters on the unquantized model instead."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MtftError(
            "peft=qlora needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(or use peft=lora, which needs no quantization)"
        )
