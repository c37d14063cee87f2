"""The real-model configs in conf/model/ (compose offline, never download) and the chat-template
prompt format they turn on for instruct models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtft.core.errors import MtftError
from mtft.data.collator import IGNORE_INDEX, TaskCollator
from mtft.data.mixture import Mixture, tokenize_mixture
from mtft.data.templates import resolve_template
from mtft.models.config import ModelConfig
from mtft.models.loading import load_tokenizer, resolve_path
from mtft.recipe.config import TrainConfig, conf_dir, register_configs

from conftest import SMALL, mixture_from_records

MODEL_DIR = conf_dir() / "model"
REAL = sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if p.stem not in ("tiny", "hf"))
EXPECTED = {
    "qwen2_5_0_5b",
    "qwen2_5_0_5b_instruct",
    "qwen2_5_7b",
    "qwen2_5_7b_instruct",
    "qwen2_5_coder_7b",
    "qwen2_5_coder_7b_instruct",
    "llama3_8b",
    "llama3_8b_instruct",
    "codellama_13b",
    "codellama_13b_instruct",
    "deepseek_coder_6_7b",
    "deepseek_coder_6_7b_instruct",
}

CORPUS = ["def add(a, b):\n    return a + b\n", "What is 1 plus 2? The answer is 3.\n"] * 50
# ChatML with a default system prompt, like Qwen2.5's template.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def compose_train(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def test_the_promised_model_configs_exist():
    assert set(REAL) >= EXPECTED


@pytest.mark.parametrize("name", REAL)
def test_model_config_is_a_checked_hub_model(name):
    model = compose_train(f"model={name}").model
    assert isinstance(model, ModelConfig) and model.build is None
    assert model.name_or_path and "/" in model.name_or_path and not Path(model.name_or_path).exists()
    assert model.trust_remote_code is False and model.dtype == "bfloat16"
    assert model.attn_implementation in ("sdpa", "flash_attention_2")
    # Instruct/chat models train in their chat format; base models on plain text.
    instruct = "instruct" in name.lower() and "instruct" in model.name_or_path.lower()
    assert model.prompt_format == ("chat" if instruct else "plain")


@pytest.mark.parametrize("name", REAL)
def test_cfg_job_composes_offline(run_mtft, name):
    """`--cfg job` prints the config without touching the network (HF_HUB_OFFLINE=1 in run_mtft)."""
    proc = run_mtft("train", f"model={name}", "peft=lora", "--cfg", "job")
    config = yaml.safe_load(proc.stdout)
    assert (
        config["model"]["name_or_path"]
        == yaml.safe_load((MODEL_DIR / f"{name}.yaml").read_text())["name_or_path"]
    )
    assert config["peft"]["method"] == "lora"


def test_default_and_hf_stay_plain():
    assert compose_train().model.prompt_format == "plain"
    assert compose_train("model=hf", "model.name_or_path=/x").model.prompt_format == "plain"


# --- chat formatting in tokenization -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = resolve_path(ModelConfig(build=SMALL), tmp_path_factory.mktemp("chat"), lambda n: CORPUS)
    tok = load_tokenizer(path, ModelConfig(build=SMALL))
    tok.chat_template = CHATML
    return tok


def mixture() -> Mixture:
    qa = [{"prompt": "What is 1 plus 2?", "response": "The answer is 3."}]
    lm = [{"text": "def add(a, b):\n    return a + b\n"}]
    return mixture_from_records({"qa": qa, "lm": lm}, {"qa": qa, "lm": lm})


def learned(row: dict) -> int:
    """Where the learned tokens start; they must run to the end."""
    labels = row["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert labels[start:] == row["input_ids"][start:]
    return start


def test_chat_format_renders_user_and_assistant_turns_and_masks_the_prompt(tokenizer, tmp_path):
    data = tokenize_mixture(mixture(), tokenizer, 128, tmp_path, template=tokenizer.chat_template)
    row = data.train[0]
    ids, plen = row["input_ids"], learned(row)
    expected_prompt = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(ids[:plen]) == expected_prompt
    assert tokenizer.decode(ids[plen:]) == "The answer is 3.<|im_end|>\n"
    # Exactly the template's own rendering: no extra bos/eos of the plain format around it.
    conversation = [
        {"role": "user", "content": "What is 1 plus 2?"},
        {"role": "assistant", "content": "The answer is 3."},
    ]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert ids[0] != tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id

    # The collator keeps the mask; the loss sees the response and end of turn.
    batch = TaskCollator(tokenizer.pad_token_id)([data.train[0], data.train[1]])
    labels = batch.labels[0]
    assert (labels[:plen] == IGNORE_INDEX).all()
    assert labels[plen : len(ids)].tolist() == ids[plen:]


def test_text_records_stay_plain_in_chat_format(tokenizer):
    data = tokenize_mixture(mixture(), tokenizer, 128, template=tokenizer.chat_template)
    row = data.train[1]
    text = tokenizer("def add(a, b):\n    return a + b\n", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [tokenizer.bos_token_id, *text, tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"]


def test_plain_format_is_unchanged_and_cached_apart(tokenizer, tmp_path):
    plain = tokenize_mixture(mixture(), tokenizer, 128, tmp_path)
    chat = tokenize_mixture(mixture(), tokenizer, 128, tmp_path, template=tokenizer.chat_template)
    prompt = tokenizer("What is 1 plus 2?", add_special_tokens=False)["input_ids"]
    response = tokenizer("The answer is 3.", add_special_tokens=False)["input_ids"]
    assert plain.train[0]["input_ids"] == [tokenizer.bos_token_id, *prompt, *response, tokenizer.eos_token_id]
    assert learned(plain.train[0]) == 1 + len(prompt)
    assert plain.train[0]["input_ids"] != chat.train[0]["input_ids"]
    assert len(list((tmp_path / "tokenized").iterdir())) == 2  # one cache entry per format


def test_template_whose_prompt_is_not_a_prefix_is_refused(tokenizer):
    """A template that renders the generation prompt unlike a finished assistant turn cannot be masked."""
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' %}{{ m['content'] }}"
        "{% else %}\n{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    with pytest.raises(
        MtftError, match="task 'qa': the chat template does not render this conversation prefix"
    ):
        tokenize_mixture(mixture(), tokenizer, 128, template=template)


def test_chat_format_without_a_template_is_a_clear_error(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(
        MtftError, match="no chat template.*model.chat_template=plain.*model.prompt_format=plain"
    ):
        resolve_template(None, tok)


@pytest.mark.slow
def test_prompt_format_reaches_tokenization_in_a_run(run_mtft, tmp_path):
    """The embedded tokenizer has no chat template: asking for the chat format stops the run clearly."""
    proc = run_mtft("train", "model.prompt_format=chat", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "model.prompt_format=chat, but the tokenizer of" in proc.stderr and "Traceback" not in proc.stderr
