"""A mixture: named tasks, each with train and validation examples, then tokenized for training.

Raw examples are `{"prompt", "response"}` strings; tokenization turns each into `input_ids` plus the
number of leading prompt tokens, which the collator masks out of the labels. With
`model.prompt_format=chat` the pair is first rendered with the tokenizer's chat template (prompt as
the user turn, response as the assistant turn), so an instruct model is trained in the format it
is prompted with; the template's header and user turn are masked like a plain prompt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from mtft.core.cache import build_dir_once
from mtft.core.errors import MtftError
from mtft.data import codetasks
from mtft.data.config import DataConfig, DataSource, TaskConfig
from mtft.data.jsonl import Example, read_jsonl

log = logging.getLogger(__name__)

TOKENIZE_VERSION = 2


@dataclass
class Mixture:
    """Raw text per task and split, in a fixed task order (the task ids used everywhere)."""

    tasks: list[str]
    train: dict[str, list[Example]]
    validation: dict[str, list[Example]]

    def corpus(self, max_chars: int) -> list[str]:
        """Training text, interleaved over tasks, for fitting a tokenizer."""
        texts, total = [], 0
        for i in range(max(len(v) for v in self.train.values())):
            for task in self.tasks:
                if i < len(self.train[task]):
                    ex = self.train[task][i]
                    texts.append(ex["prompt"] + ex["response"])
                    total += len(texts[-1])
                    if total >= max_chars:
                        return texts
        return texts


def _key(example: Example) -> str:
    return hashlib.sha1((example["prompt"] + "\x00" + example["response"]).encode()).hexdigest()


def _stable_order(examples: list[Example]) -> list[Example]:
    """An order that depends only on content, so caps and eval subsets are the same on every run."""
    return sorted(examples, key=_key)


def _cap(examples: list[Example], limit: int | None) -> list[Example]:
    return examples if limit is None else _stable_order(examples)[:limit]


def _jsonl_task(name: str, task: TaskConfig) -> tuple[list[Example], list[Example]]:
    train = [ex for path in task.train for ex in read_jsonl(path, name)]
    if task.validation:
        return train, [ex for path in task.validation for ex in read_jsonl(path, name)]
    # Hash-based hold-out: the same example always lands on the same side, duplicates included.
    threshold = int(task.val_fraction * 2**32)
    val = [ex for ex in train if int(_key(ex)[:8], 16) < threshold]
    rest = [ex for ex in train if int(_key(ex)[:8], 16) >= threshold]
    return rest, val


def build_mixture(cfg: DataConfig, cache_dir: Path) -> Mixture:
    tasks = cfg.tasks
    if cfg.source == DataSource.codetasks:
        built = codetasks.load_cached(cache_dir, cfg.val_percent, cfg.split_salt)
        raw = {name: (built[name]["train"], built[name]["validation"]) for name in cfg.tasks}
    else:
        raw = {name: _jsonl_task(name, task) for name, task in tasks.items()}

    train, validation = {}, {}
    for name, task in tasks.items():
        tr, va = raw[name]
        train[name] = _cap(tr, task.max_train_samples)
        validation[name] = _stable_order(_cap(va, task.max_val_samples))
        if not train[name]:
            raise MtftError(f"task '{name}' has no training examples")
        if not validation[name]:
            raise MtftError(
                f"task '{name}' has an empty validation set: give data.tasks.{name}.validation files "
                "or a larger val_fraction"
            )
    return Mixture(tasks=list(cfg.tasks), train=train, validation=validation)


@dataclass
class TokenizedMixture:
    """Token ids per example with task ids; validation rows are ordered by task, content-stable within."""

    tasks: list[str]
    train: Dataset  # columns: input_ids, prompt_len, task_id
    validation: Dataset
    val_rows: list[list[int]]  # per task: row indices into `validation`
    truncated: list[int]  # per task: examples (train + validation) cut to max_length

    @property
    def train_task_ids(self) -> list[int]:
        return self.train["task_id"]


def chat_texts(examples: list[Example], tokenizer) -> tuple[list[str], list[str]]:
    """Each example rendered with the chat template, split into the part to mask and the part to learn.

    The first is the conversation up to the assistant's turn (system prompt and user turn included,
    plus the generation prompt the model will be given at inference); the second is the rest of the
    full conversation: the response and the template's end-of-turn marker.
    """
    user = [[{"role": "user", "content": ex["prompt"]}] for ex in examples]
    full = [
        [*u, {"role": "assistant", "content": ex["response"]}] for u, ex in zip(user, examples, strict=True)
    ]
    prompts = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    rendered = tokenizer.apply_chat_template(full, tokenize=False)
    prompt_texts, response_texts = [], []
    for prompt, whole in zip(prompts, rendered, strict=True):
        # A template may render the last turn differently once an answer follows; mask only what
        # both renderings share, so no response text is ever masked.
        cut = len(prompt) if whole.startswith(prompt) else len(os.path.commonprefix([prompt, whole]))
        prompt_texts.append(whole[:cut])
        response_texts.append(whole[cut:])
    return prompt_texts, response_texts


def _tokenize(
    examples: list[tuple[int, Example]],
    tokenizer,
    max_length: int,
    truncated: list[int],
    prompt_format: str = "plain",
) -> dict[str, list]:
    """Token ids and prompt lengths; counts the examples cut to `max_length` per task into `truncated`."""
    prompt_texts = [ex["prompt"] for _, ex in examples]
    response_texts = [ex["response"] for _, ex in examples]
    templated = [False] * len(examples)
    if prompt_format == "chat":
        # `{"text"}` records (no prompt) are plain text to learn, not a conversation: left as they are.
        chat = [i for i, (_, ex) in enumerate(examples) if ex["prompt"]]
        if chat:
            rendered = chat_texts([examples[i][1] for i in chat], tokenizer)
            for i, p, r in zip(chat, *rendered, strict=True):
                prompt_texts[i], response_texts[i], templated[i] = p, r, True
    prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    responses = tokenizer(response_texts, add_special_tokens=False)["input_ids"]
    plain_bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    plain_eos = [tokenizer.eos_token_id]
    cols: dict[str, list] = {"input_ids": [], "prompt_len": [], "task_id": []}
    for (task_id, _), p, r, chat_format in zip(examples, prompts, responses, templated, strict=True):
        # A chat template writes its own begin-of-text and end-of-turn tokens.
        bos, eos = ([], []) if chat_format else (plain_bos, plain_eos)
        r = r + eos
        if len(bos) + len(p) + len(r) > max_length:
            # Keep the end of the prompt (nearest the answer) and the start of the response.
            truncated[task_id] += 1
            budget = max(max_length - len(r), max_length // 2) - len(bos)
            p = p[-budget:] if budget > 0 else []
            r = r[: max_length - len(bos) - len(p)]
        p = bos + p
        cols["input_ids"].append(p + r)
        cols["prompt_len"].append(len(p))
        cols["task_id"].append(task_id)
    return cols


def _fingerprint(mixture: Mixture, tokenizer, max_length: int, prompt_format: str = "plain") -> str:
    """Identifies a tokenized mixture: every example's text, the tokenizer itself and max_length."""
    h = hashlib.sha1(json.dumps([TOKENIZE_VERSION, mixture.tasks, max_length]).encode())
    if prompt_format != "plain":  # plain keeps the fingerprints (and caches) of earlier versions
        h.update(json.dumps([prompt_format, tokenizer.chat_template]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else tokenizer.name_or_path).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]).encode())
    for split in (mixture.train, mixture.validation):
        for task in mixture.tasks:
            for ex in split[task]:
                h.update(ex["prompt"].encode())
                h.update(b"\x00")
                h.update(ex["response"].encode())
                h.update(b"\x01")
    return h.hexdigest()[:20]


def tokenize_mixture(
    mixture: Mixture,
    tokenizer,
    max_length: int,
    cache_dir: Path | None = None,
    truncation: str = "truncate",
    prompt_format: str = "plain",
) -> TokenizedMixture:
    """Tokenize every example; with a cache_dir the result is stored once and memory-mapped after.

    Examples longer than `max_length` are truncated and counted (`truncation="truncate"`) or stop the
    run with the count per task (`"error"`). `prompt_format="chat"` renders prompt/response pairs with
    the tokenizer's chat template first.
    """
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MtftError(
            f"model.prompt_format=chat, but the tokenizer of {tokenizer.name_or_path or 'this model'} has "
            "no chat template (a base model?); use model.prompt_format=plain"
        )
    fingerprint = _fingerprint(mixture, tokenizer, max_length, prompt_format)
    path = cache_dir / "tokenized" / fingerprint if cache_dir else None
    if path is None:
        tokenized = _tokenize_mixture(mixture, tokenizer, max_length, prompt_format)
    else:
        build = functools.partial(_store, mixture, tokenizer, max_length, prompt_format)
        build_dir_once(path, build, marker="meta.json")
        tokenized = _load_tokenized(mixture, path)
    counts = {t: n for t, n in zip(mixture.tasks, tokenized.truncated, strict=True) if n}
    if counts and truncation == "error":
        listed = ", ".join(f"{t}: {n}" for t, n in counts.items())
        raise MtftError(
            f"examples longer than data.max_length={max_length} tokens ({listed}); raise data.max_length "
            "or set data.truncation=truncate"
        )
    if counts:
        total = len(tokenized.train) + len(tokenized.validation)
        log.info("truncated %d of %d examples to data.max_length=%d", sum(counts.values()), total, max_length)
    return tokenized


def _store(mixture: Mixture, tokenizer, max_length: int, prompt_format: str, tmp: Path) -> None:
    tokenized = _tokenize_mixture(mixture, tokenizer, max_length, prompt_format)
    tokenized.train.save_to_disk(str(tmp / "train"))
    tokenized.validation.save_to_disk(str(tmp / "validation"))
    (tmp / "meta.json").write_text(
        json.dumps({"val_rows": tokenized.val_rows, "truncated": tokenized.truncated})
    )


def _load_tokenized(mixture: Mixture, path: Path) -> TokenizedMixture:
    meta = json.loads((path / "meta.json").read_text())
    return TokenizedMixture(
        tasks=mixture.tasks,
        train=Dataset.load_from_disk(str(path / "train")),
        validation=Dataset.load_from_disk(str(path / "validation")),
        val_rows=meta["val_rows"],
        truncated=meta["truncated"],
    )


def _tokenize_mixture(
    mixture: Mixture, tokenizer, max_length: int, prompt_format: str = "plain"
) -> TokenizedMixture:
    train_ex = [(i, ex) for i, t in enumerate(mixture.tasks) for ex in mixture.train[t]]
    val_ex = [(i, ex) for i, t in enumerate(mixture.tasks) for ex in mixture.validation[t]]
    truncated = [0] * len(mixture.tasks)
    train_cols = _tokenize(train_ex, tokenizer, max_length, truncated, prompt_format)
    val_cols = _tokenize(val_ex, tokenizer, max_length, truncated, prompt_format)
    val_rows: list[list[int]] = [[] for _ in mixture.tasks]
    for row, task_id in enumerate(val_cols["task_id"]):
        val_rows[task_id].append(row)
    return TokenizedMixture(
        tasks=mixture.tasks,
        train=Dataset.from_dict(train_cols),
        validation=Dataset.from_dict(val_cols),
        val_rows=val_rows,
        truncated=truncated,
    )
