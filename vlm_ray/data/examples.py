"""One raw source row → one prepared row (the shard schema), or RowRejected with the reason.

Column mapping comes from the spec (image_column, text_column, prompt or
prompt_column, system_prompt, id_column); rows that already carry chat
`messages` are validated and passed through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vlm_ray.data.chat import BadMessages, to_messages, validate_messages
from vlm_ray.data.image_refs import image_bytes
from vlm_ray.data.images import ImageRejected, process_image
from vlm_ray.data.model_limits import ModelLimits, count_tokens
from vlm_ray.data.sources import RawRow, Source


class RowRejected(ValueError):
    """A row that cannot be used; `reason` is the sentence the quarantine records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ColumnMap:
    """Which source columns hold what, and the fixed texts (from spec.data, or the infer stage's prompt)."""

    image_column: str = "image"
    text_column: str = "text"
    prompt: str = "Describe this image."
    prompt_column: str | None = None
    system_prompt: str | None = None
    id_column: str | None = None
    require_text: bool = True


@dataclass
class Example:
    """A prepared row plus the raw image bytes' hash (for optional dedup)."""

    row: dict
    content_hash: str


def row_id(src: Source, raw: RawRow, record: dict, cols: ColumnMap) -> str:
    """Stable identity: hash of the id column's value, or of the source's name + source_id (independent of where it is stored)."""
    if cols.id_column:
        if record.get(cols.id_column) in (None, ""):
            raise RowRejected(f"row is missing required key {cols.id_column!r} (data.id_column)")
        key = f"id:{record[cols.id_column]}"
    else:
        key = f"{src.name}:{raw.source_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def build_example(raw: RawRow, src: Source, cols: ColumnMap, limits: ModelLimits) -> Example:
    """Map, validate and normalise one row; raises RowRejected naming the key or the image defect."""
    if raw.error or raw.record is None:
        raise RowRejected(raw.error or "unreadable row")
    record = raw.record
    chat = None
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as err:
                raise RowRejected(f"column 'messages' is not valid JSON: {err.msg}") from None
        try:
            chat = validate_messages(messages, require_text=cols.require_text)
        except BadMessages as err:
            raise RowRejected(f"bad chat messages: {err}") from None

    rid = row_id(src, raw, record, cols)
    if chat is not None:
        prompt, text, system = chat.prompt, chat.text, chat.system_prompt
    else:
        prompt = _prompt(record, cols)
        text = _text(record, cols)
        system = cols.system_prompt
    if text is not None and not text.strip():
        if cols.require_text:
            raise RowRejected(f"empty target text in column {cols.text_column!r}")
        text = None
    _check_length(prompt, text, limits)

    cell, column = _image_cell(record, cols, chat.image if chat else None)
    try:
        data, _ = image_bytes(cell, src, raw.base_dir, column)
        image, width, height = process_image(data, limits.image_rules)
    except ImageRejected as err:
        raise RowRejected(err.reason) from None

    messages_out = chat.messages if chat is not None else to_messages(prompt, text, system)
    row = {
        "id": rid,
        "source_id": raw.source_id,
        "image": image,
        "width": width,
        "height": height,
        "prompt": prompt,
        "system_prompt": system,
        "text": text,
        "messages": json.dumps(messages_out, ensure_ascii=False),
    }
    digest = hashlib.sha256(data)
    digest.update(b"\0" + (text or "").encode())
    return Example(row, digest.hexdigest())


def _prompt(record: dict, cols: ColumnMap) -> str:
    if cols.prompt_column is None:
        return cols.prompt
    value = record.get(cols.prompt_column)
    if not isinstance(value, str) or not value.strip():
        raise RowRejected(
            f"row is missing required key {cols.prompt_column!r} (data.prompt_column) or it is empty"
        )
    return value


def _text(record: dict, cols: ColumnMap) -> str | None:
    if cols.text_column not in record or record[cols.text_column] is None:
        if cols.require_text:
            raise RowRejected(
                f"row is missing required key {cols.text_column!r} (data.text_column)"
            )
        return None
    value = record[cols.text_column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a digit label stored as a number
    if not isinstance(value, str):
        raise RowRejected(
            f"column {cols.text_column!r} holds a {type(value).__name__}, expected text (data.text_column)"
        )
    return value


def _check_length(prompt: str, text: str | None, limits: ModelLimits) -> None:
    if text is None:
        return
    n, unit = count_tokens(limits, prompt + "\n" + text)
    if n > limits.max_seq_length:
        raise RowRejected(
            f"target text too long: prompt + answer are {n} {unit}, over model.max_seq_length "
            f"{limits.max_seq_length} (the answer has {len(text)} characters)"
        )


def _image_cell(record: dict, cols: ColumnMap, from_chat: Any) -> tuple[Any, str]:
    """The image value: the mapped column, an image inside the chat, a one-item `images` list, or `file_name`."""
    if record.get(cols.image_column) is not None:
        return record[cols.image_column], cols.image_column
    if from_chat is not None:
        return from_chat, "messages"
    images = record.get("images")
    if isinstance(images, list) and len(images) == 1:
        return images[0], "images"
    if record.get("file_name") is not None:  # the Hugging Face imagefolder metadata convention
        return record["file_name"], "file_name"
    raise RowRejected(f"row is missing required key {cols.image_column!r} (data.image_column)")
