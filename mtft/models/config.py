"""What model to train and how: the model source, the embedded tiny architecture, LoRA/QLoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtft.core.schema import Choice, at_least, choice, in_unit_interval, require


class ModelDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"  # the dtype the checkpoint was saved in


class PromptFormat(Choice):
    plain = "plain"  # prompt + response as raw text (base models)
    chat = "chat"  # a chat template (model.chat_template, or the tokenizer's) renders every conversation


class PeftMethod(Choice):
    lora = "lora"
    qlora = "qlora"  # LoRA on a base model loaded in 4 bits (bitsandbytes, CUDA only)


class LoraBias(Choice):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class ComputeDtype(Choice):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


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

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            at_least(f"model.build.{key}", getattr(self, key), 1)
        for key in ("num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            at_least(f"model.build.{key}", getattr(self, key), 1)
        at_least("model.build.tokenizer_corpus_chars", self.tokenizer_corpus_chars, 1)
        at_least("model.build.init_seed", self.init_seed, 0)
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.build.hidden_size",
            f"a multiple of num_attention_heads ({self.num_attention_heads})",
            self.hidden_size,
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "model.build.num_attention_heads",
            f"a multiple of num_key_value_heads ({self.num_key_value_heads})",
            self.num_attention_heads,
        )


@dataclass
class ModelConfig:
    # Hub id or local directory; ignored when `build` is set (the model is built locally instead).
    name_or_path: str | None = None
    build: TinyModelConfig | None = None
    revision: str | None = None  # pin a commit hash for reproducible runs
    dtype: ModelDtype = ModelDtype.float32  # dtype of the loaded weights
    # Run the model's own code from the Hub; only for architectures transformers lacks.
    trust_remote_code: bool = False
    # sdpa: PyTorch's fused attention, works everywhere; flash_attention_2: faster on Ampere+ GPUs in
    # bf16/fp16 (needs flash-attn); null: transformers' default.
    attn_implementation: str | None = "sdpa"
    # instruct/chat models want `chat`, base models `plain`.
    prompt_format: PromptFormat = PromptFormat.plain
    # With prompt_format=chat: null uses the tokenizer's template; or a built-in (chatml, or plain: visible
    # "### User:"/"### Assistant:" separators for base models), a Jinja file or a Jinja string.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.dtype = choice("model.dtype", ModelDtype, self.dtype)
        self.prompt_format = choice("model.prompt_format", PromptFormat, self.prompt_format)
        require(
            self.chat_template is None or self.prompt_format == PromptFormat.chat,
            "model.prompt_format",
            "chat when model.chat_template is set",
            self.prompt_format.value,
        )


@dataclass
class LoraAdapterConfig:
    """LoRA/QLoRA (peft): the base model is frozen and low-rank adapters are trained on the target modules."""

    method: PeftMethod = PeftMethod.lora
    r: int = 16  # rank of the adapters
    alpha: int = 32  # scaling: the update is (alpha / r) * B A; 2x the rank is the common choice
    dropout: float = 0.05  # dropout on the adapter input
    # null: every attention and MLP projection of the architecture (llama, mistral, qwen2, gemma:
    # q/k/v/o_proj + gate/up/down_proj; gpt2: c_attn, c_proj, c_fc; gpt_neox: query_key_value, dense,
    # dense_h_to_4h, dense_4h_to_h; see mtft/models/adapters.py TARGET_MODULES); other architectures:
    # "all-linear" (every linear layer but the LM head). Or a list: peft.target_modules=[q_proj,v_proj]
    target_modules: Any = None
    bias: LoraBias = LoraBias.none
    modules_to_save: list[str] | None = (
        None  # modules trained in full and saved with the adapter, e.g. [lm_head]
    )
    # QLoRA only (method=qlora):
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/parameter saved)
    compute_dtype: ComputeDtype = ComputeDtype.bfloat16  # dtype of the dequantized matmuls

    def __post_init__(self) -> None:
        self.method = choice("peft.method", PeftMethod, self.method)
        self.bias = choice("peft.bias", LoraBias, self.bias)
        self.quant_type = choice("peft.quant_type", QuantType, self.quant_type)
        self.compute_dtype = choice("peft.compute_dtype", ComputeDtype, self.compute_dtype)
        at_least("peft.r", self.r, 1)
        at_least("peft.alpha", self.alpha, 1)
        in_unit_interval("peft.dropout", self.dropout)
        targets = self.target_modules
        require(
            targets is None
            or (isinstance(targets, str) and bool(targets))
            or (
                isinstance(targets, list | tuple)
                and bool(targets)
                and all(isinstance(t, str) for t in targets)
            ),
            "peft.target_modules",
            "null, 'all-linear', or a non-empty list of module names",
            targets,
        )
