"""The embedded model: a small Llama built locally with a BPE tokenizer trained on the training split.

It is saved as an ordinary Hugging Face directory in the cache (keyed by architecture and corpus)
and loaded back through `from_pretrained`, exactly like a real model; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mtft.core.cache import build_dir_once
from mtft.models.config import TinyModelConfig
from mtft.models.saving import save_pretrained

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# The BPE trainer's merges take time quadratic in a word's length (a run of 100,000 x's: 15 s, one of
# 5 million: not done in 10 minutes), so longer runs (of non-spaces or of spaces) reach it in pieces.
LONGEST_RUN = 1000
LONG_RUN = re.compile(rf"\S{{{LONGEST_RUN + 1},}}|\s{{{LONGEST_RUN + 1},}}")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, so any text round-trips) fitted to `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_short_runs(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _short_runs(texts: list[str]) -> Iterator[str]:
    """`texts`, each run longer than LONGEST_RUN characters given as separate texts of that length."""
    for text in texts:
        start = 0
        for run in LONG_RUN.finditer(text):
            yield text[start : run.start()]
            yield from (
                text[i : min(i + LONGEST_RUN, run.end())] for i in range(run.start(), run.end(), LONGEST_RUN)
            )
            start = run.end()
        yield text[start:]


def build_tiny(cfg: TinyModelConfig, texts: list[str], out_dir: Path) -> None:
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.init_seed)
    model = LlamaForCausalLM(config)
    save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_tiny(cfg: TinyModelConfig, texts: list[str], cache_dir: Path) -> Path:
    """The cached model directory for this architecture and corpus, building it on first use."""
    digest = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode())
    path = cache_dir / "models" / f"tiny-{digest.hexdigest()[:16]}"
    if not (path / "config.json").exists():
        log.info("building the embedded tiny model and tokenizer into %s", path)
    return build_dir_once(path, lambda tmp: build_tiny(cfg, texts, tmp), marker="config.json")
