"""Loading the model and tokenizer: one `from_pretrained` path for the embedded model and real ones."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mtft.core.errors import MtftError
from mtft.models.adapters import quantization_config
from mtft.models.config import LoraAdapterConfig, ModelConfig
from mtft.models.tiny import ensure_tiny

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_path(cfg: ModelConfig, cache_dir: Path, corpus: Callable[[int], list[str]]) -> str:
    """Where to load from: the embedded model (built into the cache on first use) or the user's id/path."""
    if cfg.build is not None:
        return str(ensure_tiny(cfg.build, corpus(cfg.build.tokenizer_corpus_chars), cache_dir))
    if not cfg.name_or_path:
        raise MtftError("model.name_or_path is not set (a hub id or a local directory)")
    return cfg.name_or_path


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise MtftError(f"the tokenizer of {path} has no eos token; sequences could not be terminated")
    if tokenizer.pad_token_id is None:
        log.info("tokenizer has no pad token: using eos (%r) for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, cfg: ModelConfig, peft: LoraAdapterConfig | None = None) -> PreTrainedModel:
    """The base model; with `peft=qlora` it is quantized to 4 bits while loading, onto this rank's GPU."""
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = quantization_config(peft)
    if quantization is not None:
        # 4-bit weights are quantized as they load onto the GPU; they cannot be moved there later.
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
