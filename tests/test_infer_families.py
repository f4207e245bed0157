"""Inference inputs and stopping on the tiny models of the families beyond Qwen: one BOS per prompt,
and generation ends on every stop token the family declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlm_ray.infer.generation import prepare_inputs
from vlm_ray.models.tiny import build_tiny_model

# Families whose chat template writes the BOS token itself.
BOS_IN_TEMPLATE = ["gemma3", "llava", "mistral3", "mllama"]


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]


def _left_padded_processor(path: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return processor


@pytest.fixture(scope="session", params=BOS_IN_TEMPLATE)
def bos_family_model(request: pytest.FixtureRequest, models_dir: Path) -> Path:
    """One tiny model per family, built once per session (build_tiny_model reuses a built folder)."""
    return build_tiny_model(models_dir / request.param, family=request.param, size="tiny")


def test_each_prompt_starts_with_exactly_one_bos_when_the_template_writes_it(bos_family_model):
    processor = _left_padded_processor(bos_family_model)
    bos = processor.tokenizer.bos_token_id
    assert bos is not None
    images = [Image.new("RGB", (56, 56), "white"), Image.new("RGB", (84, 56), "white")]
    messages = [_chat("Read."), _chat("Read the number in this image, digit by digit.")]
    batch = prepare_inputs(processor, images, messages)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        prompt = ids[mask.bool()].tolist()  # the row without its left padding
        assert prompt[0] == bos, "the prompt opens with BOS"
        assert prompt.count(bos) == 1, f"one BOS, got {prompt.count(bos)}: {prompt[:6]}"
