"""The DeepSpeed JSON, generated from the `deepspeed` group and the trainer config.

Batch size, accumulation, clipping and precision are the trainer's; DeepSpeed gets the same values
so the two can never disagree. A user's own JSON file is accepted: the keys mtft owns may be left
out or set to "auto" (as with the Hugging Face Trainer), and any other value for them is an error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mtft.core.errors import MtftError
from mtft.engine.config import DeepSpeedConfig, TrainerConfig


def owned_values(trainer: TrainerConfig) -> dict[str, Any]:
    """The keys (dotted paths) the trainer config decides, so a user's JSON may not contradict them."""
    return {
        "train_micro_batch_size_per_gpu": trainer.batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "gradient_clipping": trainer.max_grad_norm or 0.0,
        "bf16.enabled": trainer.precision == "bf16",
        "fp16.enabled": False,
    }


def zero_section(cfg: DeepSpeedConfig) -> dict[str, Any]:
    """The `zero_optimization` section; the stage/offload rules are DeepSpeedConfig's own."""
    zero: dict[str, Any] = {"stage": cfg.stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.stage == 3:
        # The final model is written as one normal `save_pretrained` directory on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def deepspeed_json(cfg: DeepSpeedConfig, trainer: TrainerConfig) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize(config=...)`."""
    if cfg.config_file:
        path = Path(cfg.config_file).expanduser()
        if not path.is_file():
            raise MtftError(f"deepspeed.config_file: no such file: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MtftError(f"deepspeed.config_file {path}: not valid JSON ({e})") from None
    else:
        ds = {"zero_optimization": zero_section(cfg)}
    ds = _merge(ds, cfg.extra)
    for key, value in owned_values(trainer).items():
        current = _get(ds, key)
        if current not in (None, "auto") and current != value:
            raise MtftError(
                f"DeepSpeed config sets {key}={current!r} but the trainer config says {value!r}; "
                f'set it with trainer.* (or "auto") so the two agree'
            )
        _set(ds, key, value)
    ds.setdefault("steps_per_print", 10**9)  # mtft logs progress itself
    ds.setdefault("wall_clock_breakdown", False)
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        # mtft hands DeepSpeed its own torch AdamW, so the step runs on the CPU copy DeepSpeed keeps.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value
