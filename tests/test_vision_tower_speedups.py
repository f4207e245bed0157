"""The vision tower run faster gives what transformers gives: batched attention, patch embedding as a matmul, compiled blocks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

import vlm_ray.models.gqa_decode_attention as gqa
import vlm_ray.models.packed_vision_attention as packed
from vlm_ray.infer.generation import prepare_inputs, prompt_messages

PROMPT = "Read the number in this image."


def _image(n: int, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).text((4, h // 2 - 6), str(n), fill="black")
    return img


@pytest.fixture(scope="module")
def model_and_processor(tiny_generator):
    return tiny_generator


@pytest.mark.parametrize(
    "sizes",
    [[(56, 56)] * 3, [(56, 56), (84, 56), (112, 84)]],
    ids=["same-size images: one batched call", "mixed sizes: one call per image"],
)
def test_packed_attention_matches_transformers_sdpa(model_and_processor, sizes, monkeypatch):
    model, processor = model_and_processor
    images = [_image(i, w, h) for i, (w, h) in enumerate(sizes)]
    messages = [prompt_messages({"prompt": PROMPT, "messages": None})] * len(images)
    batch = prepare_inputs(processor, images, messages)
    model.set_attn_implementation({"vision_config": "sdpa"})
    with torch.no_grad():
        expected = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        expected_ids = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)

    calls = []
    real = packed.packed_sdpa_attention

    def spy(module, query, *args, **kwargs):
        segments = kwargs["cu_seq_lens_q"].shape[0] - 1
        calls.append(segments * kwargs["max_length_q"] == query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(packed, "packed_sdpa_attention", spy)
    assert packed.enable_packed_vision_attention(model)
    assert model.config.vision_config._attn_implementation == packed.NAME
    assert model.config.text_config._attn_implementation == "sdpa", "the language model keeps SDPA"
    with torch.no_grad():
        got = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        got_ids = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    model.set_attn_implementation({"vision_config": "sdpa"})

    same_size = len(set(sizes)) == 1
    assert calls and all(c == same_size for c in calls)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, expected_ids)


def test_packed_attention_trains_like_transformers_sdpa(new_tiny_generator_model, tiny_generator):
    """Training uses it too: the same loss and the same gradients in the vision tower."""
    _, processor = tiny_generator
    images = [_image(i, 56, 56) for i in range(3)]
    messages = [prompt_messages({"prompt": PROMPT, "messages": None})] * len(images)
    batch = prepare_inputs(processor, images, messages)
    model = new_tiny_generator_model().train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "visual" in n}
        return loss.detach(), grads

    expected_loss, expected_grads = loss_and_grads()
    assert packed.enable_packed_vision_attention(model)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cudnn_preference_reaches_the_vision_attention_and_not_the_language_model(
    model_and_processor, monkeypatch
):
    """infer.vision_attention: cudnn turns cuDNN's SDPA backend on inside the vision tower's
    attention calls only: the loader turns it off process-wide for decoding (a graph per length)."""
    model, processor = model_and_processor
    images = [_image(i, 56, 56) for i in range(3)]
    messages = [prompt_messages({"prompt": PROMPT, "messages": None})] * len(images)
    batch = prepare_inputs(processor, images, messages)
    assert packed.enable_packed_vision_attention(model)
    with torch.no_grad():
        expected = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])

    cudnn_on = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # as load_for_inference does on CUDA
    try:
        assert packed.prefer_cudnn_vision_attention(model) == len(model.model.visual.blocks)
        with torch.no_grad():
            got = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        vision_calls, cudnn_on[:] = list(cudnn_on), []
        assert not torch.backends.cuda.cudnn_sdp_enabled(), "each call restores the setting"
        with torch.no_grad():
            model.model.language_model(input_ids=batch["input_ids"][:, :8])
        language_calls = list(cudnn_on)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
        for block in model.model.visual.blocks:
            delattr(block.attn, packed.SDPA_BACKENDS_ATTR)
        model.set_attn_implementation({"vision_config": "sdpa"})

    assert vision_calls and all(vision_calls)
    assert language_calls and not any(language_calls)
    # No cuDNN on CPU: torch falls back down the list, to the same kernel as before.
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=0)


def test_cudnn_preference_needs_the_batched_vision_attention(tiny_qwen2_vl):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, attn_implementation="eager")
    assert packed.prefer_cudnn_vision_attention(model) == 0
    assert not any(hasattr(b.attn, packed.SDPA_BACKENDS_ATTR) for b in model.model.visual.blocks)


@pytest.mark.parametrize(
    ("sub_config", "enable"),
    [
        ("vision_config", packed.enable_packed_vision_attention),
        ("text_config", gqa.enable_gqa_decode_attention),
    ],
    ids=["packed vision attention", "per-KV-head decoding attention"],
)
def test_models_on_eager_attention_are_left_alone(model_and_processor, sub_config, enable):
    model, _ = model_and_processor
    model.set_attn_implementation({sub_config: "eager"})
    try:
        assert not enable(model)
        assert getattr(model.config, sub_config)._attn_implementation == "eager"
    finally:
        model.set_attn_implementation({sub_config: "sdpa"})


def test_patch_embedding_as_a_matmul_gives_the_conv3d_result(tiny_qwen2_vl):
    from transformers import AutoModelForImageTextToText

    from vlm_ray.models.patch_embed_matmul import run_patch_embeddings_as_matmul

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()
    embed = model.model.visual.patch_embed
    pixels = torch.randn(
        37, embed.proj.weight[0].numel()
    )  # 37 patches, as the processor flattens them
    with torch.no_grad():
        expected = embed(pixels)
        assert run_patch_embeddings_as_matmul(model) == 1
        got = embed(pixels)
    assert got.shape == expected.shape == (37, embed.embed_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the weights stay where they were: saving and LoRA targeting see the same parameters
    assert [n for n, _ in embed.named_parameters()] == ["proj.weight"]


def test_infer_compile_vision_compiles_every_block_and_keeps_the_result(tmp_path, tiny_qwen2_vl):
    from test_infer_loading import infer_spec
    from transformers import AutoModelForImageTextToText

    from vlm_ray.infer.loading import load_for_inference, resolve_model_ref
    from vlm_ray.models.compiled_vision import vision_blocks

    spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl, infer={"compile_vision": True})
    model, processor, note = load_for_inference(spec, resolve_model_ref(spec, "base"))
    plain = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()
    assert "vision blocks compiled" in note
    blocks = vision_blocks(model)
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in vision_blocks(plain))

    images = [_image(i, 56, 56) for i in range(3)]
    messages = [prompt_messages({"prompt": PROMPT, "messages": None})] * len(images)
    batch = prepare_inputs(processor, images, messages)
    with torch.no_grad():
        got = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        expected = plain.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
