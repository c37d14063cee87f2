"""Real chat data: every record format and file form, multi-turn masks, templates, and bad input.

The model is a small Qwen2-architecture model built here with random weights, a locally trained BPE
tokenizer with Qwen's special tokens, and Qwen2.5-Instruct's chat template: nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from mtft.core.errors import MtftError
from mtft.data.collator import IGNORE_INDEX
from mtft.data.config import DataConfig, TaskConfig, TrainOn
from mtft.data.encode import Encoder
from mtft.data.formats import TEXT
from mtft.data.mixture import build_mixture, tokenize_mixture
from mtft.data.templates import CHATML, PLAIN, resolve_template

from conftest import read_metrics

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), tools included.
QWEN2_5 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

SYSTEM, USER1, A1, USER2, A2 = "You are terse.", "Add 1 and 2.", "3", "Now times 4.", "12"
TURNS = [("system", SYSTEM), ("user", USER1), ("assistant", A1), ("user", USER2), ("assistant", A2)]
SINGLE = TURNS[:3]


def conversation_records(turns: list[tuple[str, str]]) -> dict[str, dict]:
    """One conversation as a record of each conversation format, with that format's own role names."""
    sharegpt = {"user": "human", "assistant": "gpt"}
    mftcoder = {"user": "human", "assistant": "bot"}
    return {
        "messages": {"messages": [{"role": r, "content": c} for r, c in turns]},
        "sharegpt": {"conversations": [{"from": sharegpt.get(r, r), "value": c} for r, c in turns]},
        "chat_rounds": {"chat_rounds": [{"role": mftcoder.get(r, r), "content": c} for r, c in turns]},
    }


# The same single-turn conversation with a system prompt, in each format that can hold it.
SINGLE_RECORDS = {
    **conversation_records(SINGLE),
    "alpaca": {"instruction": USER1, "input": "", "output": A1, "system": SYSTEM},
    "prompt_response": {"prompt": USER1, "response": A1, "system": SYSTEM},
}
MULTI_RECORDS = conversation_records(TURNS)
FLAT = ("alpaca", "prompt_response")  # the formats a CSV file can hold


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A small Qwen2 model with a local byte-level BPE tokenizer, Qwen's special tokens and template."""
    corpus = [f"{c} {i}" for i in range(50) for _, c in TURNS] + ["def add(a, b):\n    return a + b\n"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_5
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2-small")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    return PreTrainedTokenizerFast.from_pretrained(qwen_dir)


def write(path: Path, records: list[dict], form: str) -> Path:
    """`records` as a file (or saved dataset) of the given form; returns what a task lists."""
    if form in ("jsonl", "jsonl.gz"):
        lines = "".join(json.dumps(r) + "\n" for r in records).encode()
        out = path.with_suffix(f".{form}")
        out.write_bytes(gzip.compress(lines) if form.endswith(".gz") else lines)
        return out
    if form == "json":
        out = path.with_suffix(".json")
        out.write_text(json.dumps(records))
        return out
    ds = Dataset.from_list(records)
    if form == "parquet":
        ds.to_parquet(out := path.with_suffix(".parquet"))
    elif form == "csv":
        ds.to_csv(out := path.with_suffix(".csv"), index=False)
    elif form == "arrow":  # the Arrow IPC stream format `datasets` caches in
        table = ds.with_format("arrow")[:]
        with (
            pa.OSFile(str(out := path.with_suffix(".arrow")), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table)
    else:
        ds.save_to_disk(out := path.with_name(path.name + "-saved"))
    return out


def tokenized_rows(
    files: list[Path], cache: Path, tokenizer, template: str | None, max_length: int = 128, **task
):
    cfg = DataConfig(
        source="files",
        tasks={"t": TaskConfig(train=[str(f) for f in files], validation=[str(files[0])], **task)},
    )
    data = tokenize_mixture(build_mixture(cfg, cache), tokenizer, max_length, cache, template=template)
    return [(list(r["input_ids"]), list(r["labels"])) for r in data.train], data


def runs(tokenizer, ids: list[int], labels: list[int]) -> tuple[list[str], list[str]]:
    """(given runs, learned runs) of a row, decoded."""
    given, learned, start = [], [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            (given if labels[start] == IGNORE_INDEX else learned).append(tokenizer.decode(ids[start:i]))
            start = i
    return given, learned


# --- formats and file forms ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["jsonl", "jsonl.gz", "json", "parquet", "arrow", "saved", "csv"])
def test_every_format_and_file_form_gives_the_same_tokens(tokenizer, tmp_path, form):
    formats = FLAT if form == "csv" else SINGLE_RECORDS
    expected = None
    for fmt in formats:
        path = write(tmp_path / fmt, [SINGLE_RECORDS[fmt]], form)
        rows, _ = tokenized_rows([path], tmp_path / "cache", tokenizer, QWEN2_5)
        expected = expected or rows
        assert rows == expected, (fmt, form)
    given, learned = runs(tokenizer, *expected[0])
    assert learned == ["3<|im_end|>\n"]
    assert given == [
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nAdd 1 and 2.<|im_end|>\n<|im_start|>assistant\n"
    ]
    if form in ("jsonl", "parquet"):  # nested conversations too
        multi = None
        for fmt, record in MULTI_RECORDS.items():
            rows, _ = tokenized_rows(
                [write(tmp_path / f"multi-{fmt}", [record], form)], tmp_path / "cache", tokenizer, QWEN2_5
            )
            multi = multi or rows
            assert rows == multi, fmt


def test_multi_turn_learns_every_assistant_turn_and_its_end_token(tokenizer, tmp_path):
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]], "jsonl")
    (ids, labels), *_ = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5)[0]
    given, learned = runs(tokenizer, ids, labels)
    # Hand-written: the system prompt is kept; each answer plus <|im_end|> and its newline is learned.
    assert given == [
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nAdd 1 and 2.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nNow times 4.<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert learned == ["3<|im_end|>\n", "12<|im_end|>\n"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX].count(im_end) == 2
    # One sequence for the conversation, exactly the template's rendering.
    messages = [{"role": r, "content": c} for r, c in TURNS]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_train_on_last_assistant_and_all(tokenizer, tmp_path):
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]], "jsonl")
    (ids, labels), *_ = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5, train_on="last_assistant")[0]
    assert runs(tokenizer, ids, labels)[1] == ["12<|im_end|>\n"]
    (ids, labels), *_ = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5, train_on="all")[0]
    assert labels == ids


def test_a_long_conversation_keeps_whole_turns_from_the_start(tokenizer, tmp_path):
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]], "jsonl")
    (full, _), *_ = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5)[0]
    first_len = len(
        tokenizer(
            tokenizer.apply_chat_template([dict(role=r, content=c) for r, c in SINGLE], tokenize=False)
        )["input_ids"]
    )
    [(ids, labels)], data = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5, max_length=len(full) - 1)
    assert len(ids) == first_len and ids == full[:first_len]
    assert runs(tokenizer, ids, labels)[1] == ["3<|im_end|>\n"]
    assert data.truncated == [2]  # the train and the validation copy
    cfg = DataConfig(source="files", tasks={"t": TaskConfig(train=[str(path)], validation=[str(path)])})
    with pytest.raises(MtftError, match=r"longer than data.max_length=\d+ tokens \(t: 2\)"):
        tokenize_mixture(build_mixture(cfg, tmp_path), tokenizer, len(full) - 1, tmp_path, "error", QWEN2_5)


def test_columns_and_roles_map_the_data_as_published(tokenizer, tmp_path):
    records = [{"dialog": [{"speaker": "customer", "text": USER1}, {"speaker": "agent", "text": A1}]}]
    path = write(tmp_path / "renamed", records, "jsonl")
    rows, _ = tokenized_rows(
        [path], tmp_path, tokenizer, QWEN2_5, format="messages",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"customer": "user", "agent": "assistant"},
    )  # fmt: skip
    plain = write(tmp_path / "plain", [{"question": USER1, "answer": A1}], "jsonl")
    again, _ = tokenized_rows(
        [plain], tmp_path, tokenizer, QWEN2_5, columns={"prompt": "question", "response": "answer"}
    )
    assert rows == again and runs(tokenizer, *rows[0])[1] == ["3<|im_end|>\n"]


def test_a_directory_or_glob_reads_every_data_file_in_order(tokenizer, tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    write(folder / "a", [MULTI_RECORDS["chat_rounds"]], "jsonl")
    write(folder / "b", [SINGLE_RECORDS["alpaca"]], "parquet")
    by_dir, data = tokenized_rows([folder], tmp_path / "c", tokenizer, QWEN2_5)
    by_glob, _ = tokenized_rows([Path(f"{folder}/*")], tmp_path / "c", tokenizer, QWEN2_5)
    assert len(by_dir) == 2 and by_dir == by_glob


def test_records_and_tokens_live_in_memory_mapped_cache_files(tokenizer, tmp_path):
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]] * 3, "jsonl")
    cfg = DataConfig(source="files", tasks={"t": TaskConfig(train=[str(path)], validation=[str(path)])})
    mixture = build_mixture(cfg, tmp_path / "cache")
    assert (
        mixture.train["t"].cache_files
        and str(tmp_path / "cache") in mixture.train["t"].cache_files[0]["filename"]
    )
    data = tokenize_mixture(mixture, tokenizer, 128, tmp_path / "cache", template=QWEN2_5)
    assert data.train.cache_files  # memory-mapped from the cache, not held in memory
    entries = list((tmp_path / "cache" / "tokenized").iterdir())
    tokenize_mixture(
        build_mixture(cfg, tmp_path / "cache"), tokenizer, 128, tmp_path / "cache", template=QWEN2_5
    )
    assert list((tmp_path / "cache" / "tokenized").iterdir()) == entries  # a cache hit
    path.write_text(json.dumps(SINGLE_RECORDS["messages"]) + "\n")  # new content: a new entry
    tokenize_mixture(
        build_mixture(cfg, tmp_path / "cache"), tokenizer, 128, tmp_path / "cache", template=QWEN2_5
    )
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


# --- templates ----------------------------------------------------------------------------------


def test_builtin_and_file_templates(tokenizer, tmp_path):
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]], "jsonl")
    qwen, _ = tokenized_rows([path], tmp_path, tokenizer, QWEN2_5)
    chatml, _ = tokenized_rows([path], tmp_path, tokenizer, resolve_template("chatml", tokenizer))
    assert chatml == qwen  # with a system prompt, Qwen2.5's template is ChatML
    (tmp_path / "t.jinja").write_text(QWEN2_5)
    assert resolve_template(str(tmp_path / "t.jinja"), tokenizer) == QWEN2_5
    assert resolve_template(CHATML, tokenizer) == CHATML
    with pytest.raises(MtftError, match="model.chat_template must be one of"):
        resolve_template("no-such-template", tokenizer)
    (ids, labels), *_ = tokenized_rows([path], tmp_path, tokenizer, resolve_template("plain", tokenizer))[0]
    given, learned = runs(tokenizer, ids, labels)
    assert learned == ["3<|im_end|>", "12<|im_end|>"]  # the answer and the eos token
    assert given[0] == "You are terse.\n\n### User:\nAdd 1 and 2.\n\n### Assistant:\n" and PLAIN


def test_a_template_that_refuses_a_role_names_the_record(tokenizer, tmp_path):
    no_system = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"
    path = write(tmp_path / "chat", [MULTI_RECORDS["messages"]], "jsonl")
    with pytest.raises(
        MtftError,
        match=r"chat\.jsonl:1: the chat template refused this conversation: System role not supported",
    ):
        tokenized_rows([path], tmp_path, tokenizer, no_system)


# --- over-long records ----------------------------------------------------------------------------


class WholeEncoder(Encoder):
    """The reference: every piece tokenized whole, then the same cut."""

    def _ends(self, text: str) -> None:
        return None


class Spy:
    """A tokenizer that remembers the longest text it was given, and the texts given one at a time."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest, self.windows = tokenizer, 0, []

    def __call__(self, texts, **kwargs):
        self.longest = max(self.longest, *map(len, [texts] if isinstance(texts, str) else texts))
        if isinstance(texts, str):
            self.windows.append(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def huge_cases(big: str, template: str | None = QWEN2_5) -> list[tuple[list[str], list[str]]]:
    """Conversations with the over-long text `big` in every position (that `template` can render)."""
    s = USER1
    cases = [
        (["system", "user", "assistant"], [big, s, A1]),
        (["user", "assistant"], [big, A1]),
        (["user", "assistant"], [s, big]),
        (["system", "user", "assistant", "user", "assistant"], [s, big, A1, s, A2]),
        (["system", "user", "assistant", "user", "assistant"], [s, s, big, s, A2]),
        (["system", "user", "assistant", "user", "assistant"], [s, s, A1, big, A2]),
        (["system", "user", "assistant", "user", "assistant"], [s, s, A1, s, big]),
        ([TEXT], [big]),
    ]
    return [c for c in cases if template is not None or c[0] in (["user", "assistant"], [TEXT])]


def encode_both(tokenizer, template, max_length, big, train_on):
    """(windowed, whole) rows of every huge case, and the spy on the windowed encoder's tokenizer."""
    spy = Spy(tokenizer)
    cases = huge_cases(big, template)
    windowed = Encoder(spy, max_length, template).encode_batch(cases, train_on)
    return windowed, WholeEncoder(tokenizer, max_length, template).encode_batch(cases, train_on), spy


def cut_at_word_ends(windows: list[str], pieces: list[str]) -> bool:
    """Each window is a piece's start followed by a space after a word, or its end from such a space."""
    for w in windows:
        head = any(p.startswith(w + " ") and not w[-1].isspace() for p in pieces)
        tail = any(p.endswith(w) and w[0] == " " and not p[-len(w) - 1].isspace() for p in pieces)
        if not (head or tail):
            return False
    return True


WORDS = [
    *USER1.split(),
    "def",
    "add(a,",
    "b):\n",
    "  ",
    "\n\n",
    "\t",
    "héllo",
    "中文",
    "🙂",
    "—",
    "12345",
]


def sentencepiece_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Tokenizers that split words otherwise than byte-level BPE, trained here: Llama 2's (a "▁"
    prepended to every text, spaces as "▁", BPE over the whole text with byte fallback) or a
    SentencePiece unigram model behind a metaspace pre-tokenizer."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(200)]
    special = ["<unk>", "<s>", "</s>"]
    if kind == "llama2":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special)
        corpus = [text.replace(" ", "▁") for text in corpus]
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=special, unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("max_length", [8, 40, 300])
def test_a_huge_piece_is_tokenized_by_windows_with_the_same_rows(tokenizer, max_length):
    """Words (unicode, digits, punctuation, newlines, runs of spaces) in every position: the rows equal
    full tokenization's, with every train_on, with and without a template, for byte-level BPE (Qwen's
    fixture), Llama 2's tokenizer and a SentencePiece unigram model."""
    rng = random.Random(max_length)
    big = " ".join(rng.choice(WORDS) for _ in range(5000))
    for tok, train_ons in (
        (tokenizer, list(TrainOn)),
        (sentencepiece_tokenizer("llama2"), [TrainOn.all_assistant]),
        (sentencepiece_tokenizer("unigram"), [TrainOn.last_assistant]),
    ):
        for template in (None, QWEN2_5):
            for train_on in train_ons:
                windowed, whole, spy = encode_both(tok, template, max_length, big, train_on)
                assert windowed == whole
                assert all(truncated for _, _, truncated in windowed)
                assert spy.longest < len(big) / 2  # the huge piece was never tokenized whole
                encoder = Encoder(tok, max_length, template)
                pieces = [t for c in huge_cases(big, template) for t, _ in encoder.pieces(*c) if big in t]
                assert spy.windows and cut_at_word_ends(spy.windows, pieces)


def test_a_huge_word_keeps_a_contiguous_window_of_its_text(tokenizer):
    """Without spaces (a run of one character, as in the issue's 50 MB line, or random letters) a cut
    word may be tokenized differently: BPE merges a run of one character from its left end, so where
    its last tokens fall depends on its whole length. What holds: the same length and learned mask as
    full tokenization's, the row's text is a contiguous span of the conversation, and the start of a
    run of one character is exact."""
    rng = random.Random(0)
    for big in ("x" * 30000, "".join(rng.choice("abcdefghij") for _ in range(30000))):
        for max_length in (8, 300):
            windowed, whole, spy = encode_both(tokenizer, QWEN2_5, max_length, big, TrainOn.all)
            assert spy.longest < len(big) / 2
            for (roles, contents), (ids, labels, cut), (ids0, labels0, cut0) in zip(
                huge_cases(big), windowed, whole, strict=True
            ):
                assert cut and cut0 and len(ids) == len(ids0) <= max_length
                assert [x == IGNORE_INDEX for x in labels] == [x == IGNORE_INDEX for x in labels0]
                messages = [dict(role=r, content=c) for r, c in zip(roles, contents, strict=True)]
                rendered = big if roles == [TEXT] else tokenizer.apply_chat_template(messages, tokenize=False)
                assert tokenizer.decode(ids) in rendered
                if big[0] == "x" and roles[-1] == "assistant" and contents[-1] == big:  # the answer's start
                    assert ids == ids0


# `mtft` in a child process that prints its peak RSS growth once its modules are imported.
PEAK_RSS = """import resource, sys
import mtft.commands.preview
from mtft.commands.cli import main
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(sys.argv[1:])
print("peak growth MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)
sys.exit(rc)
"""


@pytest.mark.slow
def test_a_20_mb_line_costs_memory_on_the_order_of_its_size(mtft_env, tmp_path):
    """The issue's record (an answer of 20 MB without a space) through `mtft data preview` with the
    default model: the peak RSS grows by a small multiple of the line (reading it through `datasets`
    costs about 7x), not by the gigabytes of tokenizing it whole (1.5 GB with the former encoder)."""
    size = 20_000_000
    short = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]
    data = write(tmp_path / "huge", [{"prompt": "hi", "response": "x" * size}, *short], "jsonl")
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "data", "preview", "data=files", f"+data.tasks.t.train=[{data}]",
         f"+data.tasks.t.validation=[{write(tmp_path / 'val', short, 'jsonl')}]"],
        env={**mtft_env, "MTFT_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[[xxxx" in proc.stdout  # the answer's start, learned
    growth = int(proc.stdout.split("peak growth MB")[-1])
    assert growth < 15 * size / 2**20, proc.stdout


# --- the real CLI ---------------------------------------------------------------------------------


def mftcoder_layout(root: Path) -> Path:
    """MFTCoder's data layout: one folder per task of chat_rounds JSONL files."""
    for task, n in (("code_qa", 24), ("sql", 16)):
        folder = root / task
        folder.mkdir(parents=True)
        rounds = [
            {"chat_rounds": [{"role": "system", "content": SYSTEM}, {"role": "human", "content": f"{task} question {i}"}, {"role": "bot", "content": f"answer {i}"}]}
            for i in range(n)
        ]  # fmt: skip
        write(folder / "part-0", rounds[: n // 2], "jsonl")
        write(folder / "part-1", rounds[n // 2 :], "jsonl")
    conf = root / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "mft.yaml").write_text(
        f"source: files\ntasks:\n  code_qa: {{train: [{root / 'code_qa'}], val_fraction: 0.25}}\n"
        f"  sql: {{train: [{root / 'sql'}], val_fraction: 0.25}}\n"
    )
    return root / "conf"


def test_mftcoder_layout_trains_with_per_task_curves_and_previews(run_mtft, qwen_dir, tmp_path):
    conf = mftcoder_layout(tmp_path / "data")
    common = [
        "--config-dir",
        str(conf),
        "data=mft",
        "model=hf",
        f"model.name_or_path={qwen_dir}",
        "model.prompt_format=chat",
    ]
    run_dir = tmp_path / "run"
    run_mtft(
        "train", *common, "trainer.max_steps=4", "trainer.batch_size=4", "trainer.eval_interval=2",
        "trainer.eval_batch_size=4", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    curves = {(r["split"], r["task"]) for r in read_metrics(run_dir)}
    assert {(split, task) for split in ("train", "val") for task in ("code_qa", "sql")} <= curves

    proc = run_mtft("data", "preview", *common[2:], "--config-dir", str(conf), "-n", "1")
    assert "code_qa" in proc.stdout and "sql" in proc.stdout
    assert "[[answer" in proc.stdout and "<|im_end|>" in proc.stdout  # the learned span, end token included
    assert "You are terse." in proc.stdout


BAD_INPUTS = {
    "gzip under .jsonl": (lambda d: _raw(d / "x.jsonl", gzip.compress(b'{"text": "a"}\n')), r"x\.jsonl: gzip-compressed, not \.jsonl text"),
    "parquet under .json": (lambda d: _raw(d / "x.json", b"PAR1" + b"\0" * 20), r"x\.json: a Parquet file, not \.json text"),
    "not utf-8": (lambda d: _raw(d / "x.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'), r"x\.jsonl:2: not UTF-8 text"),
    "mixed formats": (lambda d: _jsonl(d, [SINGLE_RECORDS["messages"], SINGLE_RECORDS["alpaca"]]), r"x\.jsonl:2: record has no 'messages' field; this file's format is messages"),
    "unknown role": (lambda d: _jsonl(d, [{"messages": [{"role": "narrator", "content": "x"}]}]), r"x\.jsonl:1: message 1: unknown role 'narrator'"),
    "empty content": (lambda d: _jsonl(d, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]), r"x\.jsonl:1: message 2 \(assistant\): empty content"),
    "non-string content": (lambda d: _jsonl(d, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]), r"x\.jsonl:1: message 2: 'content' must be a string, got int"),
    "no assistant turn": (lambda d: _jsonl(d, [{"messages": [{"role": "user", "content": "q"}]}]), r"x\.jsonl:1: the conversation has no assistant turn"),
    "empty directory": (lambda d: (d / "empty").mkdir() or d / "empty", r"the directory .*empty holds no data files"),
    "empty glob": (lambda d: d / "nothing-*.jsonl", r"the glob .*nothing-\*\.jsonl matches no data files"),
}  # fmt: skip


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jsonl(folder: Path, records: list[dict]) -> Path:
    return write(folder / "x", records, "jsonl")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(run_mtft, tmp_path, case):
    make, message = BAD_INPUTS[case]
    target = make(tmp_path)
    proc = run_mtft(
        "train",
        "data=files",
        f"+data.tasks.t.train=[{target}]",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    import re

    assert re.search(message, errors[0]), errors[0]


def test_missing_mapped_column_and_offline_hub_id(run_mtft, tmp_path):
    path = write(tmp_path / "x", [{"question": "q", "response": "r"}], "jsonl")
    proc = run_mtft(
        "data",
        "preview",
        "data=files",
        f"+data.tasks.t.train=[{path}]",
        "+data.tasks.t.columns={prompt: query}",
        check=False,
    )
    assert proc.returncode == 2
    assert "x.jsonl:1: record has no 'query (columns.prompt)' field" in proc.stderr
    proc = run_mtft(
        "data", "preview", "data=files", "+data.tasks.t.hub={path: some-org/some-dataset}", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "data.tasks.t.hub: cannot load 'some-org/some-dataset'" in proc.stderr
        and "save_to_disk" in proc.stderr
    )


def test_task_options_are_checked(tmp_path):
    with pytest.raises(MtftError, match=r"data.tasks.t.columns must be keyed by one of"):
        DataConfig(source="files", tasks={"t": {"train": ["a"], "columns": {"question": "q"}}})
    with pytest.raises(
        MtftError, match=r"data.tasks.t.roles.bot must be one of \['system', 'user', 'assistant'\]"
    ):
        DataConfig(source="files", tasks={"t": {"train": ["a"], "roles": {"bot": "robot"}}})
    with pytest.raises(MtftError, match=r"data.tasks.t.train_on must be one of"):
        DataConfig(source="files", tasks={"t": {"train": ["a"], "train_on": "everything"}})
    with pytest.raises(MtftError, match=r"give data.tasks.t.train files or .hub, not both"):
        DataConfig(source="files", tasks={"t": {"train": ["a"], "hub": {"path": "x/y"}}})


def test_num_proc_gives_the_same_rows_and_names_a_bad_record(tokenizer, tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"{USER1} {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(2100)
    ]
    path = write(tmp_path / "many", records, "jsonl")
    rows = {}
    for num_proc in (1, 2):
        cache = tmp_path / f"cache{num_proc}"
        cfg = DataConfig(source="files", num_proc=num_proc, tasks={"t": TaskConfig(train=[str(path)])})
        data = tokenize_mixture(
            build_mixture(cfg, cache), tokenizer, 128, cache, template=QWEN2_5, num_proc=num_proc
        )
        rows[num_proc] = [(list(r["input_ids"]), list(r["labels"])) for r in data.train]
    assert len(rows[1]) > 1900 and rows[1] == rows[2]
    records[2049]["messages"][1]["role"] = "narrator"
    write(tmp_path / "many", records, "jsonl")
    cfg = DataConfig(source="files", num_proc=2, tasks={"t": TaskConfig(train=[str(path)])})
    with pytest.raises(MtftError, match=r"many\.jsonl:2050: message 2: unknown role 'narrator'"):
        build_mixture(cfg, tmp_path / "cache2")
