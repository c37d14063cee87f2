"""PEFT: LoRA trains only adapters, saves them in PEFT's format, reloads, exports a merged model with
the same logits; QLoRA fails clearly without CUDA; gradient checkpointing works with and without LoRA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from mtft.commands.export import run as export_main
from mtft.core.errors import MtftError
from mtft.models.adapters import apply_peft, count_parameters, quantization_config
from mtft.models.config import LoraAdapterConfig, ModelConfig, PeftMethod
from mtft.models.loading import load_model, load_tokenizer, resolve_path
from mtft.recipe import validate

from conftest import SMALL, read_metrics

CORPUS = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        pass\n"] * 50
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def small_path(tmp_path_factory) -> str:
    """A two-layer Llama built locally (a second or two), loaded through from_pretrained like any model."""
    return resolve_path(ModelConfig(build=SMALL), tmp_path_factory.mktemp("small"), lambda n: CORPUS)


def small_model(path: str) -> torch.nn.Module:
    return load_model(path, ModelConfig(build=SMALL))


def batch(seed: int = 0, vocab: int = 150) -> torch.Tensor:
    """Random token ids (the small tokenizer learns fewer than SMALL.vocab_size tokens from CORPUS)."""
    return torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def lora_modules(model: torch.nn.Module) -> set[str]:
    """Short names of the modules that carry a LoRA adapter."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}


# --- LoRA on the model, in process -------------------------------------------------------------


def test_lora_trains_only_adapter_parameters(small_path):
    torch.manual_seed(0)
    model = apply_peft(small_model(small_path), LoraAdapterConfig(r=4, alpha=8, dropout=0.0))
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Every attention and MLP projection of every layer is adapted (the llama default).
    assert lora_modules(model) == LLAMA_TARGETS
    assert len(trainable) == 2 * len(LLAMA_TARGETS) * SMALL.num_hidden_layers
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters()) > n_trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        lm_loss(model, batch(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"adapter weight {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"
            assert p.grad is None


def test_lora_knobs_reach_peft(small_path):
    cfg = LoraAdapterConfig(r=2, alpha=6, dropout=0.1, target_modules=["q_proj", "v_proj"], bias="lora_only")
    model = apply_peft(small_model(small_path), cfg)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (2, 6, 0.1, "lora_only")
    assert lora_modules(model) == {"q_proj", "v_proj"}
    assert lora.task_type == "CAUSAL_LM"
    # PEFT's all-linear: every linear layer except the output head.
    model = apply_peft(small_model(small_path), LoraAdapterConfig(target_modules="all-linear"))
    assert lora_modules(model) == LLAMA_TARGETS


def test_modules_to_save_are_trained_in_full_and_stay_tied(small_path, recwarn):
    cfg = LoraAdapterConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = apply_peft(small_model(small_path), cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = [n for n in trainable if "modules_to_save" in n]
    assert full and all(trainable[n].shape[0] == model.config.vocab_size for n in full)
    # The tiny model ties input and output embeddings; training one in full keeps them tied.
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    torch.nn.init.normal_(trainable[full[0]], std=0.05)
    assert torch.equal(_weight(head), _weight(embed))
    assert not [w for w in recwarn if "tie_word_embeddings" in str(w.message)]


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a (possibly modules_to_save-wrapped) embedding or head actually uses."""
    active = getattr(module, "modules_to_save", None)
    return (active["default"] if active is not None else module).weight


@pytest.mark.parametrize(
    "build, expected",
    [
        (
            lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)),
            {"c_attn", "c_proj", "c_fc"},
        ),
        (
            lambda: GPTNeoXForCausalLM(
                GPTNeoXConfig(
                    num_hidden_layers=1,
                    hidden_size=32,
                    num_attention_heads=2,
                    intermediate_size=64,
                    vocab_size=64,
                )
            ),
            {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
        ),
        # No entry for OPT: PEFT's all-linear, i.e. every linear layer but the output head.
        (
            lambda: OPTForCausalLM(
                OPTConfig(
                    num_hidden_layers=1,
                    hidden_size=32,
                    num_attention_heads=2,
                    ffn_dim=64,
                    vocab_size=64,
                    word_embed_proj_dim=32,
                )
            ),
            {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
        ),
    ],
    ids=["gpt2", "gpt_neox", "other: all-linear"],
)
def test_default_target_modules_per_architecture(build, expected):
    model = apply_peft(build(), LoraAdapterConfig())
    assert lora_modules(model) == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"target_modules": []}, "peft.target_modules must be"),
        ({"bias": "some"}, "peft.bias must be one of"),
        ({"r": 0}, "peft.r must be >= 1"),
        ({"dropout": 1.5}, "peft.dropout must be in [0, 1)"),
        ({"method": "dora"}, "peft.method must be one of [lora, qlora]"),
    ],
)
def test_bad_lora_settings_are_clear_errors(options, message):
    with pytest.raises(MtftError) as e:
        LoraAdapterConfig(**options)
    assert message in str(e.value)


def test_unknown_target_module_is_a_clear_error(small_path):
    with pytest.raises(MtftError, match="no_such_proj"):
        apply_peft(small_model(small_path), LoraAdapterConfig(target_modules=["no_such_proj"]))


# --- gradient checkpointing ------------------------------------------------------------------------


def layer_calls(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Forward calls of the first layer's MLP in one training step (2 = recomputed in the backward
    pass), and the gradients of the trainable parameters."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    mlp, calls = base.model.layers[0].mlp, []
    forward = mlp.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counting_forward
    model.train()
    lm_loss(model, ids).backward()
    return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft_cfg", [None, LoraAdapterConfig(dropout=0.0)], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(small_path, peft_cfg):
    ids = batch()
    results = {}
    for on in (False, True):
        torch.manual_seed(0)  # the same adapter init in both
        model = apply_peft(small_model(small_path), peft_cfg, gradient_checkpointing=on)
        assert model.config.use_cache is not on
        results[on] = layer_calls(model, ids)
    (calls_off, grads_off), (calls_on, grads_on) = results[False], results[True]
    assert (calls_off, calls_on) == (1, 2)  # checkpointed layers run again in the backward pass
    assert grads_off.keys() == grads_on.keys() and grads_on
    if peft_cfg is not None:
        assert all(".lora_" in n for n in grads_on)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], msg=name)


# --- QLoRA -----------------------------------------------------------------------------------------


def test_qlora_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MtftError) as e:
        validate.check_adapter_support(LoraAdapterConfig(method=PeftMethod.qlora))
    assert "CUDA" in str(e.value) and "peft=lora" in str(e.value)
    validate.check_adapter_support(LoraAdapterConfig())  # LoRA runs anywhere
    validate.check_adapter_support(None)


def test_qlora_without_bitsandbytes_names_the_install_command(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        validate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(MtftError, match="pip install bitsandbytes"):
        validate.check_adapter_support(LoraAdapterConfig(method=PeftMethod.qlora))


def test_qlora_loads_the_base_in_4bit_nf4_with_double_quant_and_bf16_compute(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    q = quantization_config(LoraAdapterConfig(method=PeftMethod.qlora))
    assert q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        "nf4",
        True,
        torch.bfloat16,
    )
    assert q.bnb_4bit_quant_storage == torch.bfloat16  # shardable by ZeRO-3 / FSDP
    assert quantization_config(LoraAdapterConfig()) is None and quantization_config(None) is None


def test_qlora_wiring_quantizes_at_load_then_adds_adapters(small_path, monkeypatch):
    """Without a GPU here: the 4-bit config reaches from_pretrained, then k-bit preparation, then LoRA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config"), kwargs.pop("device_map")  # no GPU to quantize on here
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model = load_model(small_path, ModelConfig(build=SMALL), LoraAdapterConfig(method=PeftMethod.qlora))
    assert seen["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert seen["device_map"] == {"": 1}  # this rank's GPU

    prepared = []

    def prepare(m, **kwargs):
        prepared.append(kwargs)
        return prepare_model_for_kbit_training(m, **kwargs)

    monkeypatch.setattr("peft.prepare_model_for_kbit_training", prepare)  # adapters imports it at call time
    model = apply_peft(model, LoraAdapterConfig(method=PeftMethod.qlora, r=4), gradient_checkpointing=True)
    assert prepared and isinstance(model, PeftModel)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.config.use_cache is False and model.get_base_model().model.layers[0].gradient_checkpointing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_qlora_cli_fails_at_start_without_cuda(run_mtft, tmp_path):
    proc = run_mtft("train", "peft=qlora", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert "error: peft=qlora needs a CUDA GPU" in out and "use peft=lora" in out.lower()
    assert "Traceback" not in out
    assert "tasks:" not in out and "model:" not in out  # stopped before any data or model work
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- end to end: train with LoRA + gradient checkpointing, reload, export ------------------------


def base_path(run_dir: Path) -> str:
    return json.loads((run_dir / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(
        ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.slow
def test_lora_run_trains_and_logs_its_trainable_parameters(lora_run):
    run_dir, out = lora_run
    assert "lora: " in out and "trainable of" in out
    assert "gradient checkpointing: on" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    train = [r for r in read_metrics(run_dir) if r["split"] == "train" and r["task"] == "all"]
    assert len(train) == 4 and all(r["loss"] is not None for r in train)


@pytest.mark.slow
def test_lora_run_saves_only_the_adapter_in_peft_format(lora_run):
    model_dir = lora_run[0] / "model"
    assert (model_dir / "adapter_config.json").is_file() and (
        model_dir / "adapter_model.safetensors"
    ).is_file()
    assert not (model_dir / "model.safetensors").exists()  # no copy of the base weights
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == LLAMA_TARGETS
    assert Path(config["base_model_name_or_path"]).is_dir()  # the tiny model in the test cache
    weights = load_file(model_dir / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    # LoRA starts with B = 0: non-zero B matrices show the adapters were trained.
    assert all(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)
    assert AutoTokenizer.from_pretrained(model_dir).eos_token is not None


@pytest.mark.slow
def test_adapter_reloads_with_peft(lora_run):
    run_dir = lora_run[0]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base_path(run_dir)), tokenizer)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path(run_dir)), run_dir / "model"
    )
    auto = AutoPeftModelForCausalLM.from_pretrained(run_dir / "model")
    torch.testing.assert_close(logits(adapted, tokenizer), logits(auto, tokenizer))
    assert not torch.allclose(logits(adapted, tokenizer), base_logits, atol=1e-3)  # the adapter matters


@pytest.mark.slow
def test_export_merges_the_adapter_with_the_same_logits(lora_run, run_mtft, tmp_path):
    run_dir = lora_run[0]
    out = tmp_path / "merged"
    proc = run_mtft("export", str(run_dir), "-o", str(out))
    assert str(out) in proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path(run_dir)), run_dir / "model"
    )
    torch.testing.assert_close(logits(merged, tokenizer), logits(adapted, tokenizer), rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(base_path(run_dir))
    assert not torch.allclose(logits(merged, tokenizer), logits(base, tokenizer), atol=1e-3)

    # The default destination is RUN_DIR/merged; an existing, non-empty one is never overwritten.
    assert export_main([str(run_dir)]) == 0 and (run_dir / "merged" / "config.json").is_file()
    assert export_main([str(run_dir), "-o", str(out)]) == 2


@pytest.mark.slow
def test_export_with_a_moved_base_model_says_how_to_fix_it(lora_run, tmp_path, capsys):
    run_dir = lora_run[0]
    assert export_main([str(run_dir), "--base", str(tmp_path / "gone"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"the base model {tmp_path / 'gone'}" in err and "is not there any more" in err and "--base" in err
    assert not (tmp_path / "x").exists()
    # An explicit --base that exists is used instead of the recorded one.
    assert export_main([str(run_dir), "--base", base_path(run_dir), "-o", str(tmp_path / "y")]) == 0
    assert (tmp_path / "y" / "model.safetensors").is_file()


def test_export_errors_are_clear(small_path, tmp_path, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert f"error: run dir not found: {tmp_path / 'nope'}" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    assert export_main([str(run)]) == 2
    assert "has no model/ directory" in capsys.readouterr().err

    # A full finetune saves the whole model in model/: nothing to merge.
    small_model(small_path).save_pretrained(run / "model")
    assert export_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "full finetune" in err and "no adapter to merge" in err and "Traceback" not in err
    assert not (run / "merged").exists()


def test_export_of_an_adapter_matches_base_plus_adapter(small_path, tmp_path):
    """In process and fast: a trained adapter saved like the recipe does, merged by `mtft export`."""
    torch.manual_seed(0)
    model = apply_peft(small_model(small_path), LoraAdapterConfig(r=4, dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # as if trained: B != 0
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    tokenizer = load_tokenizer(small_path, ModelConfig(build=SMALL))
    tokenizer.save_pretrained(run / "model")
    assert export_main([str(run)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    ids = batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, small_model(small_path)(ids).logits, atol=1e-3)
