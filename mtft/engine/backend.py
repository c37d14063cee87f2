"""The engine under the training loop: plain PyTorch (one process or DDP) or DeepSpeed ZeRO.

The trainer calls the same few methods whichever engine runs (forward through `model`, `backward`,
`step`, checkpoint and save); the backend never knows which balancer runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from mtft.core.dist import barrier, rank, world_size
from mtft.core.errors import MtftError
from mtft.engine.config import DeepSpeedConfig, TrainerConfig
from mtft.engine.precision import dtype_name, main_dtype, restore_dtypes, set_trainable_dtypes
from mtft.models.saving import save_pretrained

log = logging.getLogger("mtft")


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases), as is standard for LMs."""
    params = trainable(model)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> Any:
    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The context each forward pass runs in: nothing for fp32, bfloat16 autocast for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MtftError("trainer.precision=bf16 but this GPU does not support bfloat16; use fp32")
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold of the model: everything, or only the trainable tensors when
    most of it is frozen (adapters), since the frozen rest is reloaded from the base model."""
    named = list(module.named_parameters())
    if all(p.requires_grad for _, p in named):
        return module.state_dict()
    return {n: p.detach() for n, p in named if p.requires_grad}


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    if unexpected or names & set(missing):
        raise MtftError(
            "checkpoint does not match the model (different model or adapter settings?): "
            f"missing {sorted(names & set(missing))[:3]}, unexpected {unexpected[:3]}"
        )


def compute_dtype(module: torch.nn.Module, cfg: TrainerConfig) -> str:
    """What the matmuls run in: the autocast dtype, else the dtype most weights are in."""
    if cfg.precision == "bf16":
        return "bfloat16 (autocast)"
    return dtype_name(main_dtype(list(module.parameters())))


def _ready_for_inference(module: torch.nn.Module) -> None:
    """Training switches the KV cache off (gradient checkpointing); the saved model should use it."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = True


class TorchBackend:
    """One process, or DDP when there are several: a torch AdamW and LR schedule stepped here."""

    def __init__(self, module: torch.nn.Module, cfg: TrainerConfig, device: torch.device) -> None:
        self.cfg, self.module, self.device = cfg, module, device
        # Before DDP and the optimizer: both must see the parameters in their training dtype.
        self.loaded_dtypes = set_trainable_dtypes(module, cfg)
        self.model: torch.nn.Module = module
        if world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids)
        if cfg.compile:
            # In place (parameter names unchanged, so checkpoints and the saved model are as without);
            # around DDP, so Dynamo splits graphs at DDP's gradient buckets.
            self.model.compile()
        self.optimizer = build_optimizer(module, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast = autocast_for(cfg.precision, device)

    def describe(self) -> dict[str, str]:
        """The engine and its dtypes, for the run-start block; AdamW's states take their parameters' dtype."""
        return {
            "engine": "DDP" if world_size() > 1 else "single process",
            "compute_dtype": compute_dtype(self.module, self.cfg),
            "optimizer_state_dtype": dtype_name(main_dtype(trainable(self.module))),
        }

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around forward+backward of a micro-batch: DDP all-reduces gradients on the last one only."""
        if isinstance(self.model, DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> tuple[bool, float]:
        """Clip and update unless `skip` or the gradient is not finite; returns (applied, grad norm)."""
        norm = math.nan
        if not skip:
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm).item()
        applied = not skip and math.isfinite(norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        """Model (trainable tensors only under adapters), optimizer and schedule: all in `state.pt`."""
        return {
            "model": model_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_model_state(self.module, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, directory: Path) -> None:
        """The final model in `save_pretrained` layout (adapters only under PEFT), from rank 0, in
        the dtypes it loaded in (float32 masters go back to bf16 for a bf16 checkpoint)."""
        if rank() == 0:
            restore_dtypes(self.module, self.loaded_dtypes)
            _ready_for_inference(self.module)
            save_pretrained(self.module, directory)
        barrier()


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO 0-3, optional CPU offload) around the same AdamW and LR schedule.

    Gradient accumulation is DeepSpeed's own (`gradient_accumulation_steps` = trainer.grad_accum):
    `engine.step()` follows every backward and updates only at the accumulation boundary. Loss
    scaling stays with the trainer (`scale_wrt_gas=False`), exactly as in the plain backend.
    """

    ENGINE_TAG = "deepspeed"

    def __init__(
        self, module: torch.nn.Module, cfg: TrainerConfig, ds_cfg: DeepSpeedConfig, device: torch.device
    ) -> None:
        import deepspeed

        from mtft.engine.deepspeed_json import deepspeed_json

        self.cfg, self.module, self.device = cfg, module, device
        self.config = deepspeed_json(ds_cfg, cfg)
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=build_optimizer(module, cfg),
            lr_scheduler=functools.partial(build_scheduler, cfg=cfg),
            config=self.config,
        )
        self.model = self.engine
        # DeepSpeed casts the model itself for bf16; autocast would only add casts.
        self.autocast = contextlib.nullcontext

    def describe(self) -> dict[str, str]:
        """ZeRO 1-3 (and stage 0 in bf16) keep float32 master partitions and optimizer states."""
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer")
        masters = self.stage >= 1 or self.config["bf16"]["enabled"]
        return {
            "engine": f"DeepSpeed ZeRO-{self.stage}" + (" (optimizer offloaded to CPU)" if offload else ""),
            "compute_dtype": dtype_name(main_dtype(list(self.module.parameters()))),
            "optimizer_state_dtype": "float32" if masters else dtype_name(main_dtype(trainable(self.module))),
        }

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, skip: bool) -> tuple[bool, float]:
        """The boundary step. DeepSpeed skips an update whose gradient norm is not finite; a
        non-finite loss (`skip`) was backpropagated as such, so its gradient norm is not finite."""
        self.engine.step()
        applied = self.engine.was_step_applied()
        if skip and applied:
            log.warning("DeepSpeed applied an update although a loss was not finite (its gradients were)")
        norm = self.engine.get_global_grad_norm()
        return applied and not skip, float(norm) if norm is not None else math.nan

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {}  # model, optimizer and schedule are in DeepSpeed's own checkpoint files

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing: see `load_files`."""

    def save_files(self, directory: Path) -> None:
        """DeepSpeed's checkpoint (every rank writes its shards), through its own API."""
        self.engine.save_checkpoint(str(directory), tag=self.ENGINE_TAG)

    def load_files(self, directory: Path) -> None:
        """Counterpart of `save_files`, on every rank, before any other component is restored."""
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=self.ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise MtftError(f"cannot load the DeepSpeed checkpoint in {directory / self.ENGINE_TAG}")

    def save_pretrained(self, directory: Path) -> None:
        """ZeRO-3 shards are gathered to rank 0 (a collective), which writes the usual layout."""
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.stage == 3 else None
        if rank() == 0:
            _ready_for_inference(self.module)
            self.module.save_pretrained(directory, state_dict=state)
        barrier()


Backend = TorchBackend | DeepSpeedBackend
