"""Reading user tasks from JSONL files, with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from mtft.core.errors import MtftError

Example = dict[str, str]


def to_example(record: object, where: str, task: str | None = None) -> Example:
    """`{"prompt", "response"}` learns the response only; `{"text"}` learns all of it.

    A record may name its task (`"task": ...`); it must then be the task its file is listed under.
    """
    if not isinstance(record, dict):
        raise MtftError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if task is not None and "task" in record and record["task"] != task:
        raise MtftError(
            f"{where}: record is for task '{record['task']}' but this file belongs to task '{task}'"
        )
    if "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise MtftError(f"{where}: 'prompt' and 'response' must both be strings")
        if not prompt.strip():
            raise MtftError(f'{where}: empty prompt (use {{"text": ...}} for text without a prompt)')
        if not response.strip():
            raise MtftError(f"{where}: empty response: there is nothing to learn from this record")
        return {"prompt": prompt, "response": response}
    if "text" in record:
        if not isinstance(record["text"], str):
            raise MtftError(f"{where}: 'text' must be a string")
        if not record["text"].strip():
            raise MtftError(f"{where}: empty text")
        return {"prompt": "", "response": record["text"]}
    raise MtftError(
        f"{where}: a record needs 'prompt' and 'response', or 'text' (keys found: {sorted(record)})"
    )


def read_jsonl(path: str | Path, task: str | None = None) -> list[Example]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MtftError(f"JSONL file not found: {path}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MtftError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            examples.append(to_example(record, f"{path}:{lineno}", task))
    return examples
