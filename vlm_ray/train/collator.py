"""The CPU engine's vision SFT collator: the same batch as Unsloth's UnslothVisionDataCollator.

It follows `unsloth_zoo/vision_utils.py` (UnslothVisionDataCollator.__call__)
and `unsloth_zoo/dataset_utils.py` (train_on_responses_only with
force_match=True) step by step, for what this project feeds it (rows of chat
`messages` + `images`):

1. render each row's messages with the processor's chat template (no
   generation prompt), and run the processor on texts + images with padding,
   `add_special_tokens=False` and truncation at max_seq_length;
2. labels = input_ids with the pad token and every image placeholder token
   (vision start/end/pad, ...) set to -100;
3. with train_on_responses_only, keep labels only from just after each
   response marker (family.response_part) up to the next instruction marker
   (family.instruction_part) or the end of the row; so the answer, its
   end-of-turn token and the newline after it are learnt, nothing else.

A gpu-marked test (tests/test_unsloth_gpu.py) checks this against Unsloth's own
collator on the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlm_ray.models.families import Family

IGNORE_INDEX = -100

# Unsloth's placeholder list (unsloth_zoo/vlm_tokens.py IMAGE_TOKENS + AUDIO_TOKENS): tokens a
# processor expands or wraps around media; they carry no answer, so they are never learnt.
PLACEHOLDER_TOKENS = (
    "<|image|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "</image>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<image_soft_token>",
    "<start_of_image>",
    "<end_of_image>",
    "<|image>",
    "<image|>",
    "<|video|>",
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_LINE_BREAK|>",
    "<|IMG_PATCH|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|audio|>",
    "<|audio>",
    "<audio|>",
    "<audio_soft_token>",
    "<start_of_audio>",
    "<end_of_audio>",
    "<so_embedding>",
    "<so_start>",
    "<so_end>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)


def masked_token_ids(processor: Any) -> torch.Tensor:
    """Ids never learnt: the pad token and every media placeholder the tokenizer knows."""
    tok = getattr(processor, "tokenizer", processor)
    names = list(PLACEHOLDER_TOKENS)
    for attr in ("image_token", "audio_token"):
        if getattr(tok, attr, None):
            names.append(getattr(tok, attr))
    ids = tok.convert_tokens_to_ids(names)
    unk = getattr(tok, "unk_token_id", None)
    ids = [i for i in ids if i is not None and i != unk]
    if tok.pad_token_id is not None:
        ids.append(tok.pad_token_id)
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def _find(seq: list[int], part: list[int], start: int) -> int:
    """Index of the first occurrence of `part` in seq at or after start, or -1."""
    first, k = part[0], len(part)
    for j in range(start, len(seq) - k + 1):
        if seq[j] == first and seq[j : j + k] == part:
            return j
    return -1


def response_spans(
    input_ids: list[int],
    instruction: list[int],
    response: list[int],
    eos_id: int | None = None,
    bos_id: int | None = None,
    message_start: list[int] | None = None,
) -> list[tuple[int, int]]:
    """[start, end) of every assistant answer, scanned as unsloth_zoo's train_on_responses_only does.

    After a response marker the answer runs up to and including the EOS token;
    it stops before a BOS, before the opener every turn shares (e.g.
    <|im_start|>) and before another response marker; otherwise it runs to the
    next instruction marker or the end of the row. (unsloth_zoo 2026.10.7,
    dataset_utils.py, `_train_on_responses_only`.)
    """
    n = len(input_ids)
    ms = message_start or []
    spans: list[tuple[int, int]] = []
    j = 0
    while j < n:
        if input_ids[j : j + len(response)] == response:
            k = j + len(response)
            j = k
            while j < n:
                tok = input_ids[j]
                if eos_id is not None and tok == eos_id:
                    spans.append((k, j + 1))
                    break
                if (
                    (bos_id is not None and tok == bos_id)
                    or (ms and input_ids[j : j + len(ms)] == ms)
                    or input_ids[j : j + len(response)] == response
                ):
                    spans.append((k, j))
                    j -= 1  # revisit the boundary so a following assistant turn is not skipped
                    break
                if j == n - 1 or input_ids[j : j + len(instruction)] == instruction:
                    if j == n - 1:
                        user_j = n
                    else:
                        user_j = j
                        j = j + len(instruction) - 1
                    spans.append((k, user_j))
                    break
                j += 1
        j += 1
    return spans


def shared_message_opener(
    instruction: list[int], response: list[int], special_ids: set[int]
) -> list[int]:
    """The special-token prefix both markers share (Qwen's <|im_start|>): a turn boundary Unsloth honours."""
    opener: list[int] = []
    for q, a in zip(instruction, response, strict=False):
        if q != a:
            break
        opener.append(q)
    return opener if opener and all(i in special_ids for i in opener) else []


class VisionSFTCollator:
    """Rows of {"messages", "images"} -> input_ids, attention_mask, pixel_values, image_grid_thw, labels."""

    def __init__(
        self,
        processor: Any,
        family: Family,
        train_on_responses_only: bool,
        max_seq_length: int,
        image_max_size: int | None = None,
        dtype: torch.dtype | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of
        self.family = family
        self.train_on_responses_only = train_on_responses_only
        self.max_seq_length = max_seq_length
        self.image_max_size = image_max_size
        self.dtype = dtype
        self.masked_ids = masked_token_ids(processor)
        tok = getattr(processor, "tokenizer", processor)
        self.instruction_ids = tok(family.instruction_part, add_special_tokens=False).input_ids
        self.response_ids = tok(family.response_part, add_special_tokens=False).input_ids
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        special = set(getattr(tok, "all_special_ids", []) or [])
        special |= {
            i
            for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
            if getattr(t, "special", False)
        }
        self.message_start = shared_message_opener(self.instruction_ids, self.response_ids, special)
        if train_on_responses_only and not (self.instruction_ids and self.response_ids):
            raise ValueError(
                f"family {family.name}: instruction_part {family.instruction_part!r} or response_part "
                f"{family.response_part!r} tokenizes to nothing; fix the family table (vlm_ray/models/families.py)"
            )

    def _resize(self, images: list[Image.Image]) -> list[Image.Image]:
        """Bound the long side as Unsloth's resize=<int>, resize_dimension="max" does (prepared images are already within it)."""
        if self.image_max_size is None:
            return images
        size = self.image_max_size
        out = []
        for img in images:
            w, h = img.size
            side = max(w, h)
            if side > size:
                img = img.resize(
                    (
                        max(1, (w * size + side // 2) // side),
                        max(1, (h * size + side // 2) // side),
                    ),
                    Image.Resampling.LANCZOS,
                )
            out.append(img)
        return out

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Build one training batch from rows of chat messages + images."""
        texts, images = [], []
        for row in examples:
            messages = _drop_none_keys(row["messages"])
            texts.append(
                self.processor.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=False
                )
            )
            row_images = self._resize(list(row.get("images") or []))
            if row_images:
                images.append(row_images)
        kwargs: dict[str, Any] = dict(
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_seq_length,
        )
        if self.pad_to_multiple_of:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        if images:
            kwargs["images"] = images
        batch = self.processor(**kwargs)
        if self.dtype is not None and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)

        labels = batch["input_ids"].clone()
        labels[torch.isin(labels, self.masked_ids)] = IGNORE_INDEX
        if self.train_on_responses_only:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            for row, ids in enumerate(batch["input_ids"].tolist()):
                for start, end in response_spans(
                    ids,
                    self.instruction_ids,
                    self.response_ids,
                    self.eos_id,
                    self.bos_id,
                    self.message_start,
                ):
                    keep[row, start:end] = True
            labels[~keep] = IGNORE_INDEX
        batch["labels"] = labels
        return dict(batch)


def _drop_none_keys(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop None-valued keys inside content parts (Arrow structs fill absent keys with None)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            content = [
                {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                for part in content
            ]
        out.append({**msg, "content": content})
    return out
