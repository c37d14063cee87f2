import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtft.models.config import ModelConfig
from mtft.models.loading import load_model, load_tokenizer, resolve_path
from mtft.models.tiny import LONGEST_RUN, _short_runs, train_tokenizer

from conftest import SMALL, mixture_from_records

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
] * 50


def test_tiny_model_is_built_once_and_reloads_through_from_pretrained(tmp_path):
    cfg = ModelConfig(build=SMALL)
    calls = []

    def corpus(max_chars: int) -> list[str]:
        calls.append(max_chars)
        return CORPUS

    path = resolve_path(cfg, tmp_path, corpus)
    again = resolve_path(cfg, tmp_path, corpus)
    assert path == again and (tmp_path / "models").exists()
    stamp = (tmp_path / "models").stat().st_mtime_ns
    assert len(list((tmp_path / "models").iterdir())) == 1  # cached, not rebuilt, no temp dirs left

    tokenizer = load_tokenizer(path, cfg)
    model = load_model(path, cfg)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips code exactly

    # The same directory loads through the plain Hugging Face API with identical outputs.
    hf_model = AutoModelForCausalLM.from_pretrained(path)
    hf_tok = AutoTokenizer.from_pretrained(path)
    x = torch.tensor([ids])
    torch.testing.assert_close(model(x).logits, hf_model(x).logits)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert (tmp_path / "models").stat().st_mtime_ns == stamp


def test_a_huge_record_gives_the_tokenizer_corpus_a_bounded_share_in_short_runs():
    """At most `max_chars` of a record reach the embedded tokenizer's corpus, and a run without spaces
    reaches the BPE trainer in pieces (its merges are quadratic in a word's length: 300,000 x's took
    over 100 s whole); text without such runs is given as it is, so its tokenizer is unchanged."""
    mixture = mixture_from_records({"t": [{"text": "x" * 50_000}, {"text": "more"}]}, {"t": [{"text": "v"}]})
    assert mixture.corpus(20_000) == ["x" * 20_000]
    n = LONGEST_RUN
    assert list(_short_runs(["a b\n", "y" + " " * (n + 1) + "x" * (2 * n + 500) + " z"])) == [
        *["a b\n", "y", " " * n, " ", ""],
        *["x" * n, "x" * n, "x" * 500, " z"],
    ]
    tokenizer = train_tokenizer(["x" * 300_000 + " hello"] + CORPUS, 300)
    assert tokenizer.decode(tokenizer("x" * 5000 + " hello")["input_ids"]) == "x" * 5000 + " hello"


def test_model_dtype_is_configurable(tmp_path):
    cfg = ModelConfig(build=SMALL, dtype="bfloat16")
    path = resolve_path(cfg, tmp_path, lambda n: CORPUS)
    assert next(load_model(path, cfg).parameters()).dtype == torch.bfloat16


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
