"""Which MLPs get Unsloth's fused LoRA SwiGLU (vlm_ray/models/fused_lora_mlp.py).

The kernel itself is Triton (GPU): its loss and gradients are checked against PEFT's layers in
tests/test_unsloth_gpu.py. Here: the choice of MLPs, on the tiny Qwen2-VL with real PEFT LoRA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_ray.models.fused_lora_mlp import enable_fused_lora_mlp


def _recording_forward(calls: list):
    def forward(self, x):
        calls.append(self)
        return type(self).forward(self, x)  # the unfused maths, so outputs can be compared

    return forward


def test_every_language_mlp_is_fused_and_no_vision_mlp(tiny_qwen2_vl: Path, lora_model):
    model = lora_model(tiny_qwen2_vl)
    text_layers = model.config.get_text_config().num_hidden_layers
    calls: list = []

    assert enable_fused_lora_mlp(model, _recording_forward(calls)) == text_layers
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids)
    assert len(calls) == text_layers
    assert all(".visual." not in name for name, m in model.named_modules() if m in calls)


def test_patched_mlps_compute_what_they_computed_before(tiny_qwen2_vl: Path, lora_model):
    model = lora_model(tiny_qwen2_vl).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        enable_fused_lora_mlp(model, _recording_forward([]))
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "lora", [{"lora_dropout": 0.1}, {"target_modules": ["q_proj", "v_proj"]}], ids=str
)
def test_mlps_unsloth_s_kernel_cannot_take_are_left_alone(
    tiny_qwen2_vl: Path, lora_model, lora: dict
):
    """LoRA dropout (the kernel draws no masks) or no LoRA on the MLP: nothing is patched."""
    model = lora_model(tiny_qwen2_vl, **lora)

    assert enable_fused_lora_mlp(model, _recording_forward([])) == 0
