"""Qwen2-VL's rotary position ids for a whole batch at once are exactly transformers' row-by-row ones."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_ray.models.batched_rope_index as rope
from vlm_ray.models.batched_rope_index import batched_rope_index, enable_batched_rope_index
from vlm_ray.models.tiny import build_tiny_model

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_processor(request, models_dir):
    path = build_tiny_model(models_dir / request.param, family=request.param, size="tiny")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(
        path
    )


def _texts(processor, rows: list[tuple[int, str]]) -> list[str]:
    """Chat texts with `n` image placeholders then the prompt, per row."""
    return [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}] * n + [{"type": "text", "text": prompt}],
                }
            ],
            add_generation_prompt=True,
        )
        for n, prompt in rows
    ]


# (images per row, prompt); image sizes are drawn from SIZES in order.
BATCHES = {
    "one image per row, different prompt lengths": [
        (1, "Read."),
        (1, "Read the text, line by line."),
    ],
    "two images in a row, a text-only row": [
        (2, "Compare."),
        (0, "No image here at all."),
        (1, "?"),
    ],
}
SIZES = [(56, 56), (84, 56), (56, 112), (112, 84)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_batched_ids_equal_transformers_row_by_row(model_and_processor, batch, padding_side):
    model, processor = model_and_processor
    rows = BATCHES[batch]
    images = [
        Image.new("RGB", SIZES[i % len(SIZES)], "white") for i in range(sum(n for n, _ in rows))
    ]
    processor.tokenizer.padding_side = padding_side
    inputs = processor(
        text=_texts(processor, rows), images=images, return_tensors="pt", padding=True
    )
    assert not inputs["attention_mask"].all(), "rows of different lengths: padding to ignore"
    inner = model.model
    merge = inner.config.vision_config.spatial_merge_size
    # And without a mask (pads counted as text), as a right-padding caller may pass them.
    masks = [inputs["attention_mask"]] + ([None] if padding_side == "right" else [])
    for mask in masks:
        expected = type(inner).get_rope_index(
            inner,
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask,
        )
        got = batched_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], mask, merge
        )
        assert torch.equal(got[0], expected[0])
        assert got[0].dtype == expected[0].dtype
        assert torch.equal(got[1], expected[1])


def test_the_model_generates_the_same_tokens_with_batched_ids(model_and_processor, monkeypatch):
    """generate takes the batched path (it passes every model kwarg along) and gets the same tokens."""
    model, processor = model_and_processor
    processor.tokenizer.padding_side = "left"
    rows = BATCHES["two images in a row, a text-only row"]
    images = [Image.new("RGB", SIZES[i], (40 * i, 90, 200)) for i in range(3)]
    inputs = processor(
        text=_texts(processor, rows), images=images, return_tensors="pt", padding=True
    )

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    expected = generate()
    assert enable_batched_rope_index(model)
    assert not enable_batched_rope_index(model), "installed once"
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return batched_rope_index(*args)

    monkeypatch.setattr(rope, "batched_rope_index", spy)
    try:
        assert torch.equal(generate(), expected)
        assert calls == [inputs["input_ids"].shape], "the prompt's ids, batched, once"
    finally:
        del model.model.get_rope_index  # back to the class's method for the other tests


def test_videos_go_to_transformers_loop(model_and_processor):
    """The batched path covers images; with a video the original runs (and is what is called)."""
    model, _ = model_and_processor
    calls = []
    original = model.model.get_rope_index

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.model.get_rope_index = spy
    try:
        assert enable_batched_rope_index(model)
        ids = torch.tensor([[5, 6, 7]])
        types = torch.tensor([[0, 2, 0]])
        grid = torch.tensor([[1, 2, 2]])
        model.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=grid)
        assert calls and calls[0]["video_grid_thw"] is grid
    finally:
        del model.model.get_rope_index
