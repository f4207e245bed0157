"""infer.compile_language: the language model's MLPs and norms under torch.compile generate what eager does."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_infer_loading import infer_spec
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_ray.infer.generation import prepare_inputs, prompt_messages
from vlm_ray.infer.loading import load_for_inference, resolve_model_ref
from vlm_ray.models.compiled_language import compile_language_modules, language_elementwise_modules


def test_picks_each_layers_mlp_and_norms_and_the_final_norm(tiny_qwen2_vl):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    decoder = model.model.language_model
    expected = [decoder.layers[0].mlp, decoder.layers[1].mlp, decoder.norm]
    expected += [layer.input_layernorm for layer in decoder.layers]
    expected += [layer.post_attention_layernorm for layer in decoder.layers]
    picked = language_elementwise_modules(model)
    assert {id(m) for m in picked} == {id(m) for m in expected}
    assert len(picked) == len(expected)
    assert not any(m is model.model.visual or m in model.model.visual.modules() for m in picked)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic cache", "static cache"])
def test_compiled_mlps_and_norms_generate_the_same_tokens(
    tiny_qwen2_vl, new_tiny_generator_model, cache
):
    eager, compiled = new_tiny_generator_model(), new_tiny_generator_model()
    assert compile_language_modules(compiled) == 7
    images = [Image.new("RGB", (56 + 28 * (i % 2), 56), c) for i, c in enumerate(["white", "red"])]
    messages = [prompt_messages({"prompt": "Read.", "messages": None})] * len(images)
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    processor.tokenizer.padding_side = "left"
    batch = prepare_inputs(processor, images, messages)
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    if cache:
        kwargs["cache_implementation"] = cache
    with torch.no_grad():
        want, got = eager.generate(**batch, **kwargs), compiled.generate(**batch, **kwargs)
    assert torch.equal(got, want)


def test_the_spec_switch_compiles_them_at_load(tmp_path, tiny_qwen2_vl):
    spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl, infer={"compile_language": True})
    model, _, note = load_for_inference(spec, resolve_model_ref(spec, "base"))
    assert "language MLPs and norms compiled" in note
    assert all(m._compiled_call_impl is not None for m in language_elementwise_modules(model))
