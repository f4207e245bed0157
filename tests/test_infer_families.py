"""Inference inputs and stopping on the tiny models of the families beyond Qwen: one BOS per prompt,
and generation ends on every stop token the family declares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_ray.config import GenerationSpec
from vlm_ray.infer.generation import generate_batch, generation_kwargs, prepare_inputs
from vlm_ray.models.families import family_of
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


class _TokenCounter:
    """A transformers streamer that counts the tokens generate produced (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1

    def end(self) -> None:
        pass

    @property
    def new_tokens(self) -> int:
        return self.calls - 1


def test_generation_stops_on_the_family_stop_token_the_saved_generation_config_lost(models_dir):
    from transformers import AutoModelForImageTextToText

    path = build_tiny_model(models_dir / "gemma3", family="gemma3", size="tiny")
    assert "<end_of_turn>" in family_of(path).stop_tokens
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = _left_padded_processor(path)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    # As a model saved after training may come back: only the tokenizer's <eos> ends generation.
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    batch = prepare_inputs(processor, [Image.new("RGB", (56, 56), "white")], [_chat("Read.")])
    counter = _TokenCounter()
    kwargs = generation_kwargs(GenerationSpec(max_new_tokens=6, do_sample=False))
    # Bias the random model towards <end_of_turn>, so it is the first token it writes.
    kwargs.update(sequence_bias={(end_of_turn,): 50.0}, streamer=counter)
    (out,) = generate_batch(model, processor, batch, kwargs)
    assert counter.new_tokens == 1, "generate stopped right after <end_of_turn>"
    assert (out.ids, out.tokens, out.text) == ([end_of_turn], 1, "")
