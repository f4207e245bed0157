"""infer.fp8: which linear layers go to float8, and a clear error where float8 GEMMs cannot run.

The float8 numerics themselves need a GPU of compute capability 8.9+: tests/test_infer_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from test_infer_loading import infer_spec
from transformers import AutoModelForImageTextToText

from vlm_ray.infer.loading import load_for_inference, resolve_model_ref
from vlm_ray.models.fp8_linear import fp8_target_linears


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen2_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()


def test_vision_scope_is_the_vision_blocks_linears(tiny_model):
    names = fp8_target_linears(tiny_model, "vision")
    # One Qwen2-VL vision block (the tiny model has one): qkv and proj, the MLP's fc1 and fc2.
    assert sorted(names) == [
        "model.visual.blocks.0.attn.proj",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.blocks.0.mlp.fc1",
        "model.visual.blocks.0.mlp.fc2",
    ]


def test_all_scope_adds_every_other_linear_but_keeps_the_output_head_in_bf16(tiny_model):
    vision = set(fp8_target_linears(tiny_model, "vision"))
    every = set(fp8_target_linears(tiny_model, "all"))
    assert vision < every
    assert "model.language_model.layers.0.self_attn.q_proj" in every
    assert "model.language_model.layers.1.mlp.down_proj" in every
    assert "lm_head" not in every


def test_layers_float8_gemms_cannot_take_are_left_out():
    # torch._scaled_mm needs both dimensions divisible by 16.
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.Linear(48, 10), torch.nn.Linear(10, 32)
    )
    assert fp8_target_linears(model, "all") == ["0"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machines without CUDA")
def test_fp8_without_a_cuda_gpu_is_an_error_naming_infer_fp8(tmp_path, tiny_qwen2_vl):
    spec = infer_spec(str(tmp_path / "run"), tiny_qwen2_vl, infer={"fp8": "vision"})
    with pytest.raises(
        ValueError, match=r"infer\.fp8: 'vision' needs a CUDA GPU .* no CUDA device"
    ):
        load_for_inference(spec, resolve_model_ref(spec, "base"))
