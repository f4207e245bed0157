"""The CPU collator builds the batch Unsloth's UnslothVisionDataCollator builds: chat template + processor,
pad and image tokens never learnt, and with train_on_responses_only only the assistant's answer learnt.
(tests/test_unsloth_gpu.py compares it with Unsloth's own collator on a GPU.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlm_ray.models.families import family_of
from vlm_ray.train.collator import IGNORE_INDEX, VisionSFTCollator, response_spans

PROMPT = "Read the number in this image."
ANSWERS = ["7", "1234", "42 and 43"]


def _image(text: str, width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((8, 20), text, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # a real encoded image, decoded again as the data loader does
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _rows() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [_image(answer, 56 + 28 * (i % 2), 56)],
        }
        for i, answer in enumerate(ANSWERS)
    ]


@pytest.fixture(scope="module")
def processor(tiny_qwen2_vl: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen2_vl)


def _collator(processor, tiny_qwen2_vl: Path, responses_only: bool) -> VisionSFTCollator:
    return VisionSFTCollator(
        processor,
        family_of(tiny_qwen2_vl),
        train_on_responses_only=responses_only,
        max_seq_length=512,
    )


def test_responses_only_labels_are_the_answer_and_its_end_of_turn(processor, tiny_qwen2_vl):
    batch = _collator(processor, tiny_qwen2_vl, responses_only=True)(_rows())
    tok = processor.tokenizer
    for row, answer in enumerate(ANSWERS):
        labels = batch["labels"][row]
        learnt = labels[labels != IGNORE_INDEX].tolist()
        # the answer and its end-of-turn (EOS) token, as Unsloth learns them; not the newline after it
        assert tok.decode(learnt) == f"{answer}<|im_end|>"
        # and they are learnt where they stand in the input, as one contiguous span at the end
        kept = (labels != IGNORE_INDEX).nonzero().flatten()
        assert kept.tolist() == list(range(kept[0].item(), kept[-1].item() + 1))
        assert torch.equal(batch["input_ids"][row][kept], labels[kept])


def test_without_responses_only_only_pad_and_image_tokens_are_masked(processor, tiny_qwen2_vl):
    batch = _collator(processor, tiny_qwen2_vl, responses_only=False)(_rows())
    tok = processor.tokenizer
    never = {
        tok.pad_token_id,
        *tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]),
    }
    ids, labels = batch["input_ids"], batch["labels"]
    is_never = torch.isin(ids, torch.tensor(sorted(never)))
    assert is_never.any() and (~is_never).any()
    assert (labels[is_never] == IGNORE_INDEX).all()
    assert torch.equal(labels[~is_never], ids[~is_never])
    text = tok.decode(labels[0][labels[0] != IGNORE_INDEX].tolist())
    assert PROMPT in text and "<|im_start|>user" in text and text.endswith("7<|im_end|>\n")


def test_batch_carries_every_image_patch_and_grid(processor, tiny_qwen2_vl):
    batch = _collator(processor, tiny_qwen2_vl, responses_only=True)(_rows())
    grid = batch["image_grid_thw"]
    assert grid.shape == (len(ANSWERS), 3)
    assert batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = 2 * 2  # Qwen2-VL merges 2x2 patches into one image token
    for row in range(len(ANSWERS)):
        assert (batch["input_ids"][row] == image_pad).sum() == grid[row].prod() // merge
    assert batch["attention_mask"].shape == batch["input_ids"].shape == batch["labels"].shape


def test_pad_to_multiple_of_pads_to_a_fixed_length_and_learns_the_same_tokens(
    processor, tiny_qwen2_vl
):
    plain = _collator(processor, tiny_qwen2_vl, responses_only=True)(_rows())
    collator = VisionSFTCollator(
        processor,
        family_of(tiny_qwen2_vl),
        train_on_responses_only=True,
        max_seq_length=512,
        pad_to_multiple_of=64,
    )
    padded = collator(_rows())
    length = padded["input_ids"].shape[1]
    assert length % 64 == 0 and length > plain["input_ids"].shape[1]
    for row in range(len(ANSWERS)):
        real = padded["attention_mask"][row].bool()
        # the same tokens, the same learnt labels; the extra positions are padding, never learnt
        assert torch.equal(
            padded["input_ids"][row][real],
            plain["input_ids"][row][plain["attention_mask"][row].bool()],
        )
        assert torch.equal(
            padded["labels"][row][real], plain["labels"][row][plain["attention_mask"][row].bool()]
        )
        assert (padded["labels"][row][~real] == IGNORE_INDEX).all()
    assert torch.equal(padded["pixel_values"], plain["pixel_values"])


def test_every_assistant_turn_of_a_conversation_is_learnt_and_no_user_turn():
    user, assistant = [1, 2], [1, 3]
    #        sys  user  q   asst   a1 end  user  q2  asst  a2 a2 end
    ids = [9, *user, 5, *assistant, 6, 7, *user, 5, *assistant, 8, 8, 7]
    assert response_spans(ids, user, assistant) == [(6, 8), (13, 16)]
    assert response_spans([9, *user, 5], user, assistant) == []


def test_answer_ends_at_eos_inclusive_and_never_crosses_a_turn_opener():
    user, assistant, eos, opener = [1, 2], [1, 3], 7, [1]
    #      sys   user  q  asst  a  eos nl  user q   asst  a2 nl (no eos: next opener ends it)
    ids = [9, *user, 5, *assistant, 6, eos, 4, *user, 5, *assistant, 8, 4, *assistant, 6]
    assert response_spans(ids, user, assistant, eos_id=eos, message_start=opener) == [
        (6, 8),
        (14, 16),
        (18, 19),
    ]
