"""Chat templates, and a conversation rendered as pieces: what the model is given, and what it learns.

The learned spans are found by rendering the conversation prefix by prefix: before each assistant turn
with the generation prompt (what the model is given at inference), then with that turn. Each rendering
must extend the previous one; a template that rewrites earlier turns (some strip reasoning from past
answers) cannot be masked this way and is refused, never masked wrongly.
"""

from __future__ import annotations

from pathlib import Path

from mtft.core.errors import MtftError
from mtft.data.formats import TEXT

# ChatML, as Qwen and many fine-tunes use it; the special tokens should be in the tokenizer's vocabulary.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# For base models: visible separators in plain text, each answer ended by the eos token.
PLAIN = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n\\n' }}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{- '### User:\\n' + message['content'] }}"
    "{%- else %}{{- '### Assistant:\\n' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{%- if messages %}{{- '\\n\\n' }}{%- endif %}{{- '### Assistant:\\n' }}"
    "{%- endif %}"
)
BUILTIN = {"chatml": CHATML, "plain": PLAIN}

Piece = tuple[str, bool]  # (text, is an assistant turn)


def resolve_template(spec: str | None, tokenizer) -> str:
    """The Jinja source `model.chat_template` names (a built-in, a file, a string) or the tokenizer's own."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise MtftError(
                f"model.prompt_format=chat, but the tokenizer of {tokenizer.name_or_path or 'this model'} has "
                "no chat template (a base model?): set model.chat_template=plain (or chatml, a Jinja file "
                "or string), or use model.prompt_format=plain"
            )
        return own
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise MtftError(
        f"model.chat_template must be one of {sorted(BUILTIN)}, a Jinja file or a Jinja string, got {spec!r}"
    )


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja2's TemplateError and the templates' own raise_exception calls
        raise ValueError(f"the chat template refused this conversation: {e}") from None


def chat_pieces(tokenizer, template: str, roles: list[str], contents: list[str]) -> list[Piece]:
    """The conversation up to its last assistant turn, as alternating given and assistant pieces."""
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    pieces: list[Piece] = []
    done = ""
    for k, role in enumerate(roles):
        if role != "assistant":
            continue
        for text, is_turn in (
            (_render(tokenizer, template, messages[:k], True) if k else "", False),
            (_render(tokenizer, template, messages[: k + 1], False), True),
        ):
            if not text.startswith(done):
                raise ValueError(
                    f"the chat template does not render this conversation prefix by prefix (turn {k + 1} "
                    "changes the text before it), so the learned tokens cannot be located; use a template "
                    "whose renderings extend each other, e.g. model.chat_template=chatml"
                )
            pieces.append((text[len(done) :], is_turn))
            done = text
    return pieces


def plain_pieces(roles: list[str], contents: list[str]) -> list[Piece]:
    """Without a template: a text to learn, or a prompt followed by its response."""
    if roles == [TEXT]:
        return [(contents[0], True)]
    if roles != ["user", "assistant"]:
        raise ValueError(
            "a conversation with a system prompt or several turns needs a chat template: set "
            "model.prompt_format=chat (and model.chat_template=plain for a base model)"
        )
    return [(contents[0], False), (contents[1], True)]
