"""What model to train and how: the model source, the embedded tiny architecture, LoRA/QLoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TinyModelConfig:
    """Architecture of the embedded Llama-style model built locally (no download)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    init_seed: int = 0
    tokenizer_corpus_chars: int = 4_000_000


@dataclass
class ModelConfig:
    # Hub id or local directory; ignored when `build` is set (the model is built locally instead).
    name_or_path: str | None = None
    build: TinyModelConfig | None = None
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    # plain: prompt + response as raw text | chat: the tokenizer's chat template (prompt = user turn,
    # response = assistant turn); instruct/chat models want `chat`, base models `plain`.
    prompt_format: str = "plain"


@dataclass
class LoraAdapterConfig:
    """LoRA (peft): the base model is frozen and low-rank adapters are trained on the target modules."""

    method: str = "lora"  # lora | qlora (the base model is loaded in 4 bits first; see QLoraAdapterConfig)
    r: int = 16  # rank of the adapters
    alpha: int = 32  # scaling: the update is (alpha / r) * B A
    dropout: float = 0.05
    # null: every attention and MLP projection of the architecture (mtft/adapters.py TARGET_MODULES;
    # PEFT's "all-linear" for other architectures); "all-linear"; or a list of module names.
    target_modules: Any = None
    bias: str = "none"  # none | all | lora_only
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter


@dataclass
class QLoraAdapterConfig(LoraAdapterConfig):
    """QLoRA: LoRA on a base model quantized to 4 bits by bitsandbytes (needs a CUDA GPU)."""

    method: str = "qlora"
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/parameter saved)
    compute_dtype: str = "bfloat16"  # dtype of the dequantized matmuls: bfloat16 | float16 | float32
