"""Decoding with grouped-query attention per KV head gives exactly what transformers' SDPA gives."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from PIL import Image, ImageDraw

import vlm_ray.models.gqa_decode_attention as gqa
from vlm_ray.infer.generation import prepare_inputs, prompt_messages

PROMPTS = ["Read.", "Read the number in this image, digit by digit, please."]


def _image(n: int) -> Image.Image:
    img = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(img).text((4, 22), str(n), fill="black")
    return img


def _generate(model, batch, cache: str | None):
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **({"cache_implementation": cache} if cache else {}),
        )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic cache", "static cache"])
def test_grouped_decoding_matches_transformers_sdpa_with_padding(
    tiny_generator, cache, monkeypatch
):
    model, processor = tiny_generator
    text = model.config.text_config
    assert text.num_attention_heads > text.num_key_value_heads, "the tiny model uses GQA"
    # Prompts of different lengths: left padding, so every decoding step carries a mask.
    messages = [prompt_messages({"prompt": p, "messages": None}) for p in PROMPTS]
    batch = prepare_inputs(processor, [_image(1), _image(2)], messages)
    assert not batch["attention_mask"].all()
    expected_ids, expected_scores = _generate(model, batch, cache)

    fallback_q_lens = []
    real = hf_sdpa.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        fallback_q_lens.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", spy)
    try:
        assert gqa.enable_gqa_decode_attention(model)
        assert text._attn_implementation == gqa.NAME
        got_ids, got_scores = _generate(model, batch, cache)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})

    # Prefill (many query tokens) still goes to transformers; no decoding step does.
    assert fallback_q_lens and all(q > 1 for q in fallback_q_lens)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_scores, expected_scores, rtol=1e-4, atol=1e-4)
