"""The dtypes of trainable weights under the plain PyTorch engine: float32 masters by default.

Real checkpoints load in bfloat16, and a bf16 weight cannot take an update smaller than ~1/256 of
itself: at a finetuning learning rate most AdamW updates round away, and the AdamW states lose the
same precision. So before the optimizer is built, trainable parameters in half precision are upcast
to float32 (the optimizer states follow their parameters' dtype); compute still runs in bf16 when
`trainer.precision=bf16` asks for autocast, and frozen weights (a LoRA base) stay as they loaded,
which is where the memory is. `trainer.pure_bf16=true` trains in bf16 instead, with a warning. The
final model is saved in the dtypes it loaded in. DeepSpeed keeps its own float32 masters and never
comes here.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from mtft.core.dist import rank
from mtft.engine.config import TrainerConfig

log = logging.getLogger("mtft")


def set_trainable_dtypes(module: torch.nn.Module, cfg: TrainerConfig) -> dict[str, torch.dtype]:
    """Cast the trainable floating-point parameters to float32 (bfloat16 with `cfg.pure_bf16`), in
    place, before any optimizer sees them; returns the dtype each cast parameter loaded in."""
    target = torch.bfloat16 if cfg.pure_bf16 else torch.float32
    loaded: dict[str, torch.dtype] = {}
    for name, param in module.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != target:
            loaded[name] = param.dtype
            param.data = param.data.to(target)
    if cfg.pure_bf16 and rank() == 0:
        log.warning(
            "trainer.pure_bf16=true: trainable weights and AdamW states are bfloat16, with no float32 "
            "master copy; updates smaller than ~1/256 of a weight are lost"
        )
    elif loaded and rank() == 0:
        kinds = ", ".join(sorted({str(d).removeprefix("torch.") for d in loaded.values()}))
        log.info("%d trainable tensors upcast from %s to float32 (master weights)", len(loaded), kinds)
    return loaded


def restore_dtypes(module: torch.nn.Module, loaded: dict[str, torch.dtype]) -> None:
    """Cast the parameters `set_trainable_dtypes` changed back to their loaded dtypes (for saving:
    a bf16 checkpoint is finetuned into a bf16 model). Tied weights stay tied: the cast is in place."""
    for name, param in module.named_parameters():
        if name in loaded:
            param.data = param.data.to(loaded[name])


def main_dtype(params: list[torch.nn.Parameter]) -> torch.dtype | None:
    """The dtype holding most of `params`' elements (None for no parameters)."""
    counts: Counter[torch.dtype] = Counter()
    for p in params:
        counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"
