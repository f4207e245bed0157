"""The Unsloth vision chat format: build it from columns, or validate rows that already have it.

user turn = the instruction text + one {"type": "image"} part; assistant turn =
the target text; an optional system turn first. The image itself is stored
beside the messages (the shard's `image` column), never inside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BadMessages(ValueError):
    """Chat-formatted input that does not fit the expected shape; the message says what is wrong."""


def to_messages(prompt: str, text: str | None, system_prompt: str | None) -> list[dict]:
    """The Unsloth messages for one example (no assistant turn when text is None)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append(
        {"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}
    )
    if text is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return messages


@dataclass
class ChatRow:
    """What a validated chat-formatted row contributes to a prepared row."""

    messages: list[dict]  # as given, minus any embedded image payload
    prompt: str
    text: str | None
    system_prompt: str | None
    image: Any  # an image found inside the user turn's image part, if any


def _text_of(turn: dict, where: str) -> str:
    content = turn.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadMessages(f"{where}: content must be a list of parts or a string")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise BadMessages(f"{where}.content[{j}]: each part needs a 'type'")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise BadMessages(f"{where}.content[{j}]: a text part needs a string 'text'")
            texts.append(part["text"])
        elif part["type"] != "image":
            raise BadMessages(
                f"{where}.content[{j}]: unknown part type {part['type']!r} (expected 'text' or 'image')"
            )
    return "\n".join(texts)


def validate_messages(messages: Any, require_text: bool = True) -> ChatRow:
    """Check an already-chat-formatted row (one image, user then assistant); raises BadMessages naming the bad turn."""
    if not isinstance(messages, list) or not messages:
        raise BadMessages("messages must be a non-empty list of turns")
    system_prompt = None
    prompt: str | None = None
    text: str | None = None
    image: Any = None
    images = 0
    cleaned: list[dict] = []
    for i, turn in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise BadMessages(f"{where}: a turn needs role system, user or assistant")
        role = turn["role"]
        body = _text_of(turn, where)
        content = turn["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image":
                    if role != "user":
                        raise BadMessages(f"{where}: images belong in a user turn, not {role}")
                    images += 1
                    if part.get("image") is not None:
                        image = part["image"]
                    part = {"type": "image"}
                parts.append(part)
            turn = {**turn, "content": parts}
        cleaned.append(turn)
        if role == "system":
            if i != 0:
                raise BadMessages(f"{where}: the system turn must come first")
            system_prompt = body
        elif role == "user" and prompt is None:
            prompt = body
        elif role == "assistant":
            text = body
    if images != 1:
        raise BadMessages(f"messages must hold exactly one image part, found {images}")
    if prompt is None:
        raise BadMessages("messages have no user turn")
    if cleaned[-1]["role"] != "assistant" and require_text:
        raise BadMessages("the last turn must be the assistant's answer (the training target)")
    return ChatRow(cleaned, prompt, text, system_prompt, image)
