"""Batched generation on the tiny random Qwen2-VL: left padding, size batches, determinism, error rows."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from vlm_ray.config import GenerationSpec
from vlm_ray.infer.generation import (
    generate_batch,
    generation_kwargs,
    predict_table,
    prepare_inputs,
    prompt_messages,
    size_batches,
    upload_images,
)

PROMPT = "Read the number in this image."


def _png(n: int, w: int, h: int) -> bytes:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).text((4, h // 2 - 6), str(n), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rows(sizes: list[tuple[int, int]]) -> list[dict]:
    return [
        {
            "id": f"row-{i}",
            "source_id": str(i),
            "image": _png(100 + i, w, h),
            "width": w,
            "height": h,
            "prompt": PROMPT,
            "system_prompt": None,
            "text": str(100 + i),
            "messages": None,
        }
        for i, (w, h) in enumerate(sizes)
    ]


@pytest.fixture(scope="module")
def tiny(tiny_generator):
    return tiny_generator


GREEDY = GenerationSpec(max_new_tokens=8, min_p=None, do_sample=False, batch_size=4)


def test_a_row_predicted_alone_and_in_a_left_padded_batch_gives_the_same_text(tiny):
    model, processor = tiny
    rows = _rows([(84, 56), (56, 56), (112, 84)])  # 6, 4 and 12 image tokens: the batch is padded
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    messages = [prompt_messages(r) for r in rows]
    kwargs = dict(
        generation_kwargs(GREEDY), min_new_tokens=8
    )  # no early stop: all 8 tokens compared
    batch = prepare_inputs(processor, images, messages)
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all(), "pads are on the left"
    together = generate_batch(model, processor, batch, kwargs)
    alone = [
        generate_batch(model, processor, prepare_inputs(processor, [img], [m]), kwargs)[0]
        for img, m in zip(images, messages, strict=True)
    ]
    assert [g.ids for g in together] == [g.ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.tokens == 8 for g in together)
    assert len({tuple(g.ids) for g in together}) > 1, "different images, different outputs"


def test_greedy_predictions_are_deterministic_and_in_input_order(tiny):
    model, processor = tiny
    table = pa.Table.from_pylist(_rows([(84, 56), (56, 56), (84, 56), (56, 84), (56, 56)]))
    first = predict_table(model, processor, table, GREEDY)
    second = predict_table(model, processor, table, GREEDY.model_copy(update={"batch_size": 2}))
    assert [r["id"] for r in first] == [f"row-{i}" for i in range(5)]
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]
    assert len({r["prediction"] for r in first}) > 1
    assert all(r["error"] is None and 0 < r["tokens"] <= 8 for r in first)
    assert [r["reference"] for r in first] == [str(100 + i) for i in range(5)]


def test_undecodable_image_gets_an_error_record_and_the_other_rows_are_predicted(tiny):
    model, processor = tiny
    rows = _rows([(56, 56), (56, 56), (84, 56)])
    rows[1]["image"] = b"\x89PNG\r\n\x1a\n this is not an image"
    records = predict_table(model, processor, pa.Table.from_pylist(rows), GREEDY)
    assert [r["id"] for r in records] == ["row-0", "row-1", "row-2"]
    bad = records[1]
    assert bad["prediction"] is None and bad["tokens"] == 0
    assert bad["error"].startswith("image could not be decoded")
    assert all(r["error"] is None and r["prediction"] is not None for r in (records[0], records[2]))


def test_batches_hold_images_of_similar_size():
    keys = [(56 * 84, 5), (56 * 56, 5), (112 * 84, 5), (56 * 56, 5), (56 * 84, 5)]
    assert size_batches(keys, 2) == [[1, 3], [0, 4], [2]]


def test_sampling_knobs_reach_generate_only_when_sampling():
    greedy = generation_kwargs(GenerationSpec(top_p=0.9, min_p=0.1, max_new_tokens=5))
    assert greedy["do_sample"] is False and greedy["top_p"] is None and "min_p" not in greedy
    sampled = generation_kwargs(
        GenerationSpec(
            do_sample=True, temperature=0.7, top_p=0.9, min_p=0.1, repetition_penalty=1.1
        )
    )
    assert sampled == {
        "max_new_tokens": 128,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
    }


def test_prompt_is_the_rows_chat_turns_without_the_answer():
    row = {
        "prompt": PROMPT,
        "messages": '[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},'
        '{"role": "user", "content": [{"type": "text", "text": "Read it."}, {"type": "image"}]},'
        '{"role": "assistant", "content": [{"type": "text", "text": "42"}]}]',
    }
    assert [t["role"] for t in prompt_messages(row)] == ["system", "user"]
    built = prompt_messages({"prompt": PROMPT, "messages": None, "system_prompt": None})
    assert built == [
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}
    ]


def test_generate_runs_only_while_the_callers_gpu_lock_is_held(tiny, monkeypatch):
    import threading

    model, processor = tiny
    lock = threading.Lock()
    held = []
    real = model.generate

    def generate(*args, **kwargs):
        held.append(lock.locked())
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    table = pa.Table.from_pylist(_rows([(56, 56), (84, 56), (56, 56)]))
    records = predict_table(
        model, processor, table, GREEDY.model_copy(update={"batch_size": 2}), lock
    )
    assert held == [True, True] and not lock.locked()  # two batches, each inside the lock
    assert all(r["error"] is None for r in records)


@pytest.mark.parametrize("max_cache_len", [None, 600], ids=["sized by the batch", "preallocated"])
def test_a_static_kv_cache_predicts_what_the_dynamic_cache_predicts(tiny, max_cache_len):
    model, processor = tiny
    table = pa.Table.from_pylist(_rows([(84, 56), (56, 56), (84, 56)]))
    dynamic = predict_table(model, processor, table, GREEDY)
    static_spec = GREEDY.model_copy(
        update={"cache_implementation": "static", "max_cache_len": max_cache_len}
    )
    static = predict_table(model, processor, table, static_spec)
    kwargs = generation_kwargs(static_spec)
    assert kwargs["cache_implementation"] == "static"
    assert kwargs.get("max_cache_len") == max_cache_len
    assert [r["prediction"] for r in static] == [r["prediction"] for r in dynamic]
    assert all(r["error"] is None for r in static)


def test_images_uploaded_as_one_tensor_per_size_give_the_processor_output_of_the_pil_images(tiny):
    import torch

    _, processor = tiny
    rows = _rows([(84, 56), (56, 56), (84, 56), (56, 84)])  # three sizes, one of them twice
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    images[1] = images[1].convert("L")  # a grey image is uploaded as RGB, as the processor does
    messages = [prompt_messages(r) for r in rows]

    tensors = upload_images(images, "cpu")
    assert [tuple(t.shape) for t in tensors] == [(3, 56, 84), (3, 56, 56), (3, 56, 84), (3, 84, 56)]
    assert all(t.dtype == torch.uint8 and t.is_contiguous() for t in tensors)
    from_pil = prepare_inputs(processor, images, messages)
    from_tensors = prepare_inputs(processor, images, messages, device=torch.device("cpu"))
    assert torch.equal(from_tensors["pixel_values"], from_pil["pixel_values"])
    assert torch.equal(from_tensors["image_grid_thw"], from_pil["image_grid_thw"])
    assert torch.equal(from_tensors["input_ids"], from_pil["input_ids"])
