"""Record formats: every supported record shape becomes one conversation, a list of (role, content).

Roles are `system`, `user` and `assistant`; a `{"text"}` record is the single role `text` (all of it
is learned). The format is detected from a file's first record unless a task sets `format:`, and a
task's `columns:` and `roles:` rename fields and roles, so data is read as it was published.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtft.data.config import ROLES, Format

TEXT = "text"  # the role of a plain-text record

# Record field of each conversation format, and the role/content keys of its messages.
CONVERSATION_FIELDS = {
    Format.messages: ("messages", "role", "content"),
    Format.sharegpt: ("conversations", "from", "value"),
    Format.chat_rounds: ("chat_rounds", "role", "content"),
}
# The roles the formats use (OpenAI/TRL, ShareGPT, MFTCoder), mapped to ours; a task's `roles:` adds to these.
DEFAULT_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
}


# `{"prompt", "response"}` and `{"text"}` records may share a file.
PLAIN_FORMATS = (Format.prompt_response, Format.text)


class RecordError(ValueError):
    """A record that cannot be read: `row` of file `file_id` (mtft.data.sources.Origins), which the
    message turns into `file:line`. Raised inside `Dataset.map`, so it must pickle (all in args)."""

    def __init__(self, row: int, message: str, file_id: int = -1) -> None:
        super().__init__(row, message, file_id)
        self.row, self.message, self.file_id = row, message, file_id


def detect(record: Mapping[str, Any], columns: Mapping[str, str]) -> Format:
    """The format of `record`, from the fields it has (after renaming by `columns`)."""

    def has(name: str) -> bool:
        return record.get(columns.get(name, name)) is not None

    for fmt, (field, _, _) in CONVERSATION_FIELDS.items():
        if has(field):
            return fmt
    if has("instruction") and has("output"):
        return Format.alpaca
    if has("prompt") or has("response"):
        return Format.prompt_response
    if has("text"):
        return Format.text
    raise ValueError(
        "cannot tell the record's format from its fields "
        f"{sorted(k for k, v in record.items() if v is not None)}: expected messages, conversations, "
        "chat_rounds, instruction+output, prompt+response or text (or map yours with the task's columns:)"
    )


class Reader:
    """Turns records of one format into conversations; `roles` and `columns` as in TaskConfig. A record
    may name its task (`"task": ...`); it must then be `task`, the task its file is listed under."""

    def __init__(
        self, fmt: Format, columns: Mapping[str, str], roles: Mapping[str, str], task: str | None = None
    ) -> None:
        self.fmt, self.columns, self.task = fmt, dict(columns), task
        self.roles = {**DEFAULT_ROLES, **roles}

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def _field(self, record: Mapping[str, Any], name: str, required: bool = True) -> Any:
        value = record.get(self.column(name))
        if value is None and required:
            shown = name if self.column(name) == name else f"{self.column(name)} (columns.{name})"
            raise ValueError(
                f"record has no '{shown}' field; this file's format is {self.fmt.value} "
                "(a file holds one format; set the task's format: or columns: if this one is wrong)"
            )
        return value

    def _text(self, record: Mapping[str, Any], name: str, required: bool = True) -> str:
        value = self._field(record, name, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"'{self.column(name)}' must be a string, got {type(value).__name__}")
        return value

    def conversation(self, record: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """(roles, contents) of one record; raises ValueError saying what is wrong with it."""
        named = record.get("task")
        if self.task is not None and named is not None and named != self.task:
            raise ValueError(f"record is for task '{named}' but this file belongs to task '{self.task}'")
        fmt = self.fmt
        if fmt in PLAIN_FORMATS:  # mtft's first JSONL format allowed both record kinds in one file
            fmt = Format.text if record.get(self.column("text")) is not None else Format.prompt_response
        if fmt == Format.text:
            text = self._text(record, "text")
            if not text.strip():
                raise ValueError("empty text")
            return [TEXT], [text]
        if fmt in CONVERSATION_FIELDS:
            turns = self._turns(record)
        elif fmt == Format.alpaca:
            instruction, extra = self._text(record, "instruction"), self._text(record, "input", False)
            prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
            turns = [("user", prompt), ("assistant", self._text(record, "output"))]
        else:
            turns = [("user", self._text(record, "prompt")), ("assistant", self._text(record, "response"))]
        if fmt in (Format.alpaca, Format.prompt_response):
            system = self._text(record, "system", False)
            if system.strip():
                turns.insert(0, ("system", system))
        return _checked(turns)

    def _turns(self, record: Mapping[str, Any]) -> list[tuple[str, str]]:
        field, role_key, content_key = CONVERSATION_FIELDS[self.fmt]
        messages = self._field(record, field)
        role_key, content_key = self.columns.get("role", role_key), self.columns.get("content", content_key)
        if not isinstance(messages, list):
            raise ValueError(
                f"'{self.column(field)}' must be a list of messages, got {type(messages).__name__}"
            )
        turns = []
        for i, message in enumerate(messages, start=1):
            if not isinstance(message, Mapping) or not isinstance(message.get(role_key), str):
                raise ValueError(f"message {i} needs a '{role_key}' string and a '{content_key}'")
            role = self.roles.get(message[role_key])
            if role is None:
                known = sorted(r for r, ours in self.roles.items() if ours in ROLES)
                raise ValueError(
                    f"message {i}: unknown role '{message[role_key]}' (known: {', '.join(known)}; map it "
                    "with the task's roles:, e.g. roles: {" + f"{message[role_key]}: user" + "})"
                )
            content = message.get(content_key)
            if not isinstance(content, str):
                raise ValueError(
                    f"message {i}: '{content_key}' must be a string, got {type(content).__name__}"
                )
            turns.append((role, content))
        return turns


def _checked(turns: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The conversation rules: a system prompt only first, no empty turns, at least one assistant turn."""
    if turns and turns[0][0] == "system" and not turns[0][1].strip():
        turns = turns[1:]  # an empty system prompt is no system prompt
    for i, (role, content) in enumerate(turns, start=1):
        if role == "system" and i > 1:
            raise ValueError(f"message {i}: a system message must come first")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("the conversation has no assistant turn: there is nothing to learn from it")
    return [r for r, _ in turns], [c for _, c in turns]
