"""Full finetuning of a bf16 checkpoint keeps float32 master weights (issue 13), through the real CLI.

A small Qwen2-architecture model is built locally and saved in bfloat16, like every published
checkpoint, then finetuned with `model=hf` at a constant lr of 2e-5 for 30 steps. In bf16 most AdamW
updates are smaller than half a bf16 step of the weight and round away; with float32 masters every
projection weight moves, and most still differ from the start after the final model is rounded back
to bf16 for saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtft.core.errors import MtftError
from mtft.engine.backend import TorchBackend
from mtft.engine.config import TrainerConfig
from mtft.models.adapters import apply_peft
from mtft.models.config import LoraAdapterConfig
from mtft.models.tiny import train_tokenizer
from mtft.recipe.validate import validate

from conftest import CODETASKS, compose_train, tiny_lm

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CORPUS = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n        pass\n"] * 50
RUN = [
    "model=hf",
    "trainer.lr=2e-5",
    "trainer.scheduler=constant",
    "trainer.warmup_steps=0",
    "trainer.max_steps=30",
    "trainer.batch_size=8",
    "trainer.eval_interval=30",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
    "trainer.save_interval=null",
    "data.max_length=128",
    # 30 steps of 8 see 240 examples: tokenizing all of codetasks for this model would cost more than
    # the finetune (the cap changes nothing that is checked here).
    *(f"+data.tasks.{task}.max_train_samples=64" for task in CODETASKS),
    *(f"+data.tasks.{task}.max_val_samples=8" for task in CODETASKS),
]


def small_qwen2(vocab_size: int, **special_tokens: int) -> torch.nn.Module:
    sizes = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256}
    model = tiny_lm("qwen2", vocab_size, **sizes, tie_word_embeddings=True, **special_tokens)
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_qwen(tmp_path_factory) -> Path:
    """A two-layer Qwen2 with a locally trained tokenizer, saved in bfloat16."""
    path = tmp_path_factory.mktemp("qwen2-bf16")
    tokenizer = train_tokenizer(CORPUS, 400)
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    small_qwen2(len(tokenizer), **ids).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention and MLP projection weights, by name without the model prefix."""
    return {
        name.removeprefix("model."): tensor
        for name, tensor in state.items()
        if name.endswith(".weight") and any(p in name for p in PROJECTIONS)
    }


def changed_share(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> float:
    """The share of projection weight elements whose value differs from the start."""
    changed = sum(int((start[n].float() != end[n].float()).sum()) for n in start)
    return changed / sum(t.numel() for t in start.values())


def finetune(run_mtft, model: Path, run_dir: Path, *extra: str) -> tuple[dict, dict, str]:
    """Run the real CLI; the checkpoint's model state, the saved model's weights and the log."""
    proc = run_mtft("train", *RUN, f"model.name_or_path={model}", f"hydra.run.dir={run_dir}", *extra)
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)["backend"]["model"]
    return projections(state), projections(load_file(run_dir / "model" / "model.safetensors")), proc.stderr


@pytest.mark.slow
def test_full_finetuning_of_a_bf16_model_keeps_fp32_masters(run_mtft, bf16_qwen, tmp_path):
    start = projections(load_file(bf16_qwen / "model.safetensors"))
    assert {t.dtype for t in start.values()} == {torch.bfloat16}
    run_dir = tmp_path / "run"
    masters, saved, log = finetune(run_mtft, bf16_qwen, run_dir)

    # The checkpoint holds float32 master weights, and every projection weight has moved.
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert changed_share(start, masters) > 0.99
    # The final model is bf16 again, as it loaded, and most weights still differ after rounding.
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((run_dir / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert changed_share(start, saved) > 0.6

    # The run-start block says so, on the console and in summary.json.
    setup = json.loads((run_dir / "summary.json").read_text())["setup"]
    assert setup["trainable_dtype"] == "float32" and setup["optimizer_state_dtype"] == "float32"
    assert setup["engine"] == "single process" and setup["global_batch"] == 8
    assert "in float32; compute float32; optimizer states float32; attention sdpa" in log
    assert "upcast from bfloat16 to float32 (master weights)" in log


@pytest.mark.slow
def test_pure_bf16_trains_in_bf16_and_warns(run_mtft, bf16_qwen, tmp_path):
    start = projections(load_file(bf16_qwen / "model.safetensors"))
    run_dir = tmp_path / "run"
    weights, saved, log = finetune(run_mtft, bf16_qwen, run_dir, "trainer.pure_bf16=true")

    assert "trainer.pure_bf16=true: trainable weights and AdamW states are bfloat16" in log
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # Most updates are lost to bf16 rounding (what every full finetune did before float32 masters).
    assert changed_share(start, weights) < 0.5
    assert all(torch.equal(weights[n], saved[n]) for n in weights)
    setup = json.loads((run_dir / "summary.json").read_text())["setup"]
    assert setup["trainable_dtype"] == "bfloat16" and setup["optimizer_state_dtype"] == "bfloat16"


def test_lora_adapters_train_in_fp32_on_a_frozen_bf16_base():
    model = apply_peft(small_qwen2(300), LoraAdapterConfig())
    backend = TorchBackend(model, TrainerConfig(lr=1e-3), torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert {p.dtype for p in frozen} == {torch.bfloat16}  # where the memory is
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert backend.step(skip=False)[0]
    states = [s for group in backend.optimizer.state.values() for s in group.values() if torch.is_tensor(s)]
    assert {s.dtype for s in states if s.ndim > 0} == {torch.float32}
    assert backend.describe() == {
        "engine": "single process",
        "compute_dtype": "bfloat16",  # the frozen base's matmuls
        "optimizer_state_dtype": "float32",
    }


def test_pure_bf16_is_refused_under_deepspeed():
    cfg = compose_train(["deepspeed=zero2", "trainer.pure_bf16=true"])
    with pytest.raises(MtftError, match="trainer.pure_bf16=true applies to the plain PyTorch engine"):
        validate(cfg)
