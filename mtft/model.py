"""Loading the model and tokenizer: one `from_pretrained` path for the embedded model and real ones."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mtft.config import ModelConfig
from mtft.errors import MtftError
from mtft.tiny import ensure_tiny

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


def load_model(path: str, cfg: ModelConfig) -> PreTrainedModel:
    if cfg.dtype not in DTYPES:
        raise MtftError(f"model.dtype must be one of {list(DTYPES)}, got '{cfg.dtype}'")
    kwargs = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
