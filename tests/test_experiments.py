"""The real-model experiments (conf/experiment/<family>_<method>.yaml, hf_<method>.yaml) and the
learning-rate warning that points at them (issue 13).

Everything here composes configs only; parameter counts come from transformers configs built on the
meta device, so no weights exist and nothing is downloaded. (Not `accelerate.init_empty_weights`:
it unties tied embeddings, counting Qwen2.5-0.5B as 630M parameters instead of 494M.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from mtft.models.config import TinyModelConfig
from mtft.recipe.config import TrainConfig, conf_dir
from mtft.recipe.runinfo import LARGE_MODEL, USUAL_LR, lr_warning, method

from conftest import compose_train

EXPERIMENTS = conf_dir() / "experiment"
FAMILIES = ["qwen2_5_7b", "qwen2_5_coder_7b", "llama3_8b", "deepseek_coder_6_7b", "codellama_13b"]
METHODS = ["lora", "qlora", "full"]
REAL = sorted(
    p.stem
    for p in EXPERIMENTS.glob("*.yaml")
    if p.stem.startswith("hf_") or p.stem.rsplit("_", 1)[-1] in METHODS
)
# Qwen2.5-0.5B's and Qwen2.5-7B's architectures (their config.json values).
QWEN_0_5B = Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
QWEN_7B = Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)


def parameters_of(config: PretrainedConfig) -> int:
    """The model's parameter count, from its config alone: built on the meta device, no weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def experiment(stem: str) -> TrainConfig:
    extra = ["model=hf", "model.name_or_path=/models/any"] if stem.startswith("hf_") else []
    return compose_train([f"experiment={stem}", *extra])


def test_every_family_has_lora_qlora_and_full_and_each_method_a_generic_one():
    expected = {f"{f}_{m}" for f in FAMILIES for m in METHODS} | {f"hf_{m}" for m in METHODS}
    assert expected | {"qwen2_5_0_5b_lora", "qwen2_5_0_5b_full"} == set(REAL)


@pytest.mark.parametrize("stem", REAL)
def test_experiment_key_values(stem):
    cfg = experiment(stem)
    family, kind = stem.rsplit("_", 1)
    t = cfg.trainer
    assert method(cfg) == kind
    if family != "hf":
        model_file = conf_dir() / "model" / f"{family}.yaml"
        assert cfg.model.name_or_path == yaml.safe_load(model_file.read_text())["name_or_path"]
        assert cfg.model.dtype == "bfloat16" and cfg.model.prompt_format == "plain"
    # A published recipe's learning rate for the method, and never the lr warning.
    low, high = USUAL_LR[kind]
    assert low <= t.lr <= high and lr_warning(cfg, 10 * LARGE_MODEL) is None
    assert (
        t.lr == {"full": 2e-5 if family == "deepseek_coder_6_7b" else 1e-5, "lora": 2e-4, "qlora": 2e-4}[kind]
    )
    assert (t.scheduler, t.warmup_steps, t.max_steps) == ("cosine", 100, 1000)
    assert (t.batch_size, t.grad_accum, cfg.data.max_length) == (4, 4, 2048)
    assert (t.adam_beta2, t.weight_decay) == (0.999, 0.0)
    assert t.precision == "bf16" and t.gradient_checkpointing and not t.pure_bf16
    assert t.max_grad_norm == (0.3 if kind == "qlora" else 1.0)
    assert t.eval_batches * t.eval_batch_size == 64 and t.max_steps % t.eval_interval == 0
    # Full finetuning of a 7B-13B model shards its float32 masters with ZeRO-3; smaller ones need none.
    large_full = kind == "full" and family not in ("hf", "qwen2_5_0_5b")
    assert (cfg.deepspeed.stage if cfg.deepspeed else None) == (3 if large_full else None)
    # CoBa's warm-up and slope window fit the run: a tenth and a fifth of it, window 2x warm-up.
    b = cfg.balancer
    warmup, probes = b.window(t.max_steps)
    assert b.name == "coba" and warmup * 10 == t.max_steps and probes * b.update_interval == 2 * warmup


def test_the_instruct_variant_and_the_balancer_can_still_be_chosen():
    cfg = compose_train(["experiment=qwen2_5_7b_lora", "model=qwen2_5_7b_instruct", "balancer=uniform"])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and cfg.model.prompt_format == "chat"
    assert cfg.balancer.name == "uniform" and cfg.peft.method == "lora" and cfg.trainer.lr == 2e-4


def test_lr_warning_fires_for_a_large_model_with_the_tiny_defaults(tmp_path: Path):
    """`model=hf` on a 0.5B model keeps the embedded demo's lr 2e-3: 40x a full-finetuning rate."""
    QWEN_0_5B.save_pretrained(tmp_path)  # config.json only: a model dir without weights
    parameters = parameters_of(QWEN_0_5B)
    assert 490e6 < parameters < 500e6
    cfg = compose_train(["model=hf", f"model.name_or_path={tmp_path}"])
    assert cfg.trainer.lr == 2e-3
    assert lr_warning(cfg, parameters) == (
        "trainer.lr=0.002 is above the usual range for full finetuning of a 0.49B-parameter model "
        "(5e-06 to 5e-05); for tested settings run mtft train experiment=hf_full (or set trainer.lr)"
    )
    lora = compose_train(["model=hf", f"model.name_or_path={tmp_path}", "peft=lora"])
    assert "usual range for LoRA of a 0.49B-parameter model (5e-05 to 0.0003)" in lr_warning(lora, parameters)
    assert "experiment=hf_lora" in lr_warning(lora, parameters)
    # Within the range: no warning.
    tuned = compose_train(["model=hf", f"model.name_or_path={tmp_path}", "trainer.lr=2e-5"])
    assert lr_warning(tuned, parameters) is None


def test_lr_warning_names_the_shipped_models_experiment():
    """The README's old example: an instruct model with LoRA and the demo's defaults."""
    cfg = compose_train(["model=qwen2_5_7b_instruct", "peft=lora"])
    warning = lr_warning(cfg, parameters_of(QWEN_7B))
    assert warning is not None and "LoRA of a 7.6B-parameter model" in warning
    assert warning.endswith(
        "run mtft train experiment=qwen2_5_7b_lora model=qwen2_5_7b_instruct (or set trainer.lr)"
    )
    qlora = compose_train(["model=llama3_8b", "peft=qlora"])
    assert "experiment=llama3_8b_qlora (or" in lr_warning(qlora, 8 * 10**9)


def test_the_embedded_default_does_not_warn():
    cfg = compose_train([])
    tiny = TinyModelConfig()
    assert cfg.model.build == tiny and cfg.trainer.lr == 2e-3
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = LlamaConfig(
        **{f: getattr(tiny, f) for f in fields}, num_key_value_heads=tiny.num_key_value_heads
    )
    assert lr_warning(cfg, parameters_of(config)) is None
