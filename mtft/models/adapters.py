"""Preparing a loaded model for training: LoRA/QLoRA adapters (peft) and gradient checkpointing.

The recipe calls `apply_peft` right after `load_model`; with `peft=none` only gradient checkpointing
(if asked for) is applied. QLoRA needs the base model quantized while it loads, so `load_model` asks
`quantization_config` for the bitsandbytes settings (`mtft.recipe.validate` has already refused a
QLoRA run that cannot work here).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from mtft.core.errors import MtftError
from mtft.models.config import LoraAdapterConfig

log = logging.getLogger("mtft")

_ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every attention and MLP projection, per `config.model_type`: adapting all of them is what QLoRA
# (Dettmers et al., 2023) found necessary to match full finetuning; PEFT's own default is q/v only.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": _ATTENTION_MLP,
    "mistral": _ATTENTION_MLP,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # experts are not nn.Linear in every version
    "qwen2": _ATTENTION_MLP,
    "qwen3": _ATTENTION_MLP,
    "gemma": _ATTENTION_MLP,
    "gemma2": _ATTENTION_MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
ALL_LINEAR = "all-linear"  # PEFT: every linear layer except the output head

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_qlora(cfg: LoraAdapterConfig | None) -> bool:
    return cfg is not None and cfg.method == "qlora"


def quantization_config(cfg: LoraAdapterConfig | None) -> Any | None:
    """bitsandbytes settings for loading the base model (QLoRA), or None when it loads unquantized."""
    if cfg is None or not is_qlora(cfg):
        return None
    from transformers import BitsAndBytesConfig

    compute = COMPUTE_DTYPES[cfg.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(cfg.quant_type),
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        # Packed 4-bit weights stored as the compute dtype (same bytes) can be flattened and sharded
        # together with the other parameters, which ZeRO-3 and FSDP need.
        bnb_4bit_quant_storage=compute,
    )


def default_target_modules(model: PreTrainedModel) -> list[str] | str:
    """The modules LoRA adapts when `peft.target_modules` is null, chosen by the architecture."""
    return TARGET_MODULES.get(getattr(model.config, "model_type", ""), ALL_LINEAR)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they stand for."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing: it needs no input that requires grad (frozen embeddings under
    LoRA are fine) and allows `autograd.grad` (GradNorm); the KV cache is useless in training."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MtftError(
            f"trainer.gradient_checkpointing=true, but {type(model).__name__} does not support "
            "gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    log.info("gradient checkpointing: on (non-reentrant); activations are recomputed in the backward pass")


def apply_peft(
    model: PreTrainedModel, cfg: LoraAdapterConfig | None, gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """Make `model` ready to train: gradient checkpointing if asked, then LoRA adapters if configured.

    With LoRA only the adapters (and `modules_to_save`) require grad, so the optimizer sees nothing
    else; the returned PeftModel saves just the adapter with `save_pretrained`.
    """
    if cfg is None:
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model  # the run-start block says what is trained

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_qlora(cfg):
        # Freezes the 4-bit base and casts the remaining half-precision weights (norms, embeddings)
        # to fp32 for stable training. Non-reentrant checkpointing needs none of its input-grad hooks.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)

    targets = cfg.target_modules
    if targets is None:
        targets = default_target_modules(model)
    elif not isinstance(targets, str):
        targets = list(targets)
    extra = {}
    if cfg.modules_to_save and "ensure_weight_tying" in LoraConfig.__dataclass_fields__:
        # A model with tied input/output embeddings keeps them tied when one is trained in full.
        extra["ensure_weight_tying"] = bool(getattr(model.config, "tie_word_embeddings", False))
    lora = LoraConfig(
        **extra,
        task_type="CAUSAL_LM",
        # GPT-2 style Conv1D layers store their weight transposed; peft must know (it warns otherwise).
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=str(cfg.bias),
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
    )
    try:
        with quiet_peft():
            model = get_peft_model(model, lora)
    except ValueError as e:
        raise MtftError(f"peft: {str(e).splitlines()[0]} (peft.target_modules={targets!r})") from None
    log.info("%s: r=%d, alpha=%d, target modules %s", cfg.method, cfg.r, cfg.alpha, targets)
    _log_parameters(model, cfg.method)
    return model


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft probes the old `is_gradient_checkpointing` name, which transformers 5 flags as deprecated:
    a warning users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _log_parameters(model: torch.nn.Module, what: str) -> None:
    trainable, total = count_parameters(model)
    log.info(
        "%s: %s trainable of %s parameters (%.2f%%)",
        what,
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )
