"""train.fp8 on a GPU of compute capability 8.9+: the compiled quantization is the eager one, the
float8 layer stays close to bf16 at a real shape and halves its weight's memory, and both engines'
train stage trains close to the same run in bf16. Skipped elsewhere (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def float8_gpu() -> None:
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability 8.9+")


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_at_a_7b_shape_the_float8_layer_is_close_to_bf16_in_half_the_memory(
    scaling: str, float8_gpu
) -> None:
    import torch

    from vlm_ray.models.fp8_frozen_linear import (
        Float8FrozenLinear,
        quantize_activation,
        quantize_pow2,
    )

    torch.manual_seed(0)
    linear = torch.nn.Linear(3584, 18944, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.requires_grad_(False)
    x = torch.randn(1280, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1280, 18944, device="cuda", dtype=torch.bfloat16)
    rowwise = scaling == "row"
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        (q, scale), (q_eager, scale_eager) = (
            quantize_activation(x.detach(), dtype, rowwise),
            quantize_pow2(x.detach(), dtype, rowwise),
        )
        assert torch.equal(scale, scale_eager)
        # Triton's float8 casts may round a rare tie differently from eager's; nothing more
        differ = (q.view(torch.uint8) != q_eager.view(torch.uint8)).float().mean().item()
        assert differ < 1e-3

    ref = linear(x)
    (ref_grad_x,) = torch.autograd.grad(ref, x, grad)
    layer = Float8FrozenLinear(linear, scaling)
    weight_bytes = linear.weight.numel() * linear.weight.element_size()
    before = torch.cuda.memory_allocated()
    del linear  # its bf16 weight is gone; the layer keeps only the float8 bits

    assert before - torch.cuda.memory_allocated() >= weight_bytes
    assert layer.weight_bits.nbytes * 2 == weight_bytes
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out.float().flatten(), ref.float().flatten(), dim=0) > 0.998
    assert cos(grad_x.float().flatten(), ref_grad_x.float().flatten(), dim=0) > 0.995


def test_the_train_stage_trains_close_to_bf16_with_float8_base_layers(
    train_engine: str, float8_gpu, tiny_qwen2_vl: Path, logged_training_run: Callable
) -> None:
    train = {"engine": train_engine, "max_steps": 3, "per_device_train_batch_size": 2}
    plain, plain_losses = logged_training_run(tiny_qwen2_vl, "plain", 8, train)
    # The tiny model's layers are narrower than the default train.fp8_min_features.
    fp8_on = {**train, "fp8": True, "fp8_min_features": 16}
    fp8, fp8_losses = logged_training_run(tiny_qwen2_vl, "fp8", 8, fp8_on)
    tensorwise, tensorwise_losses = logged_training_run(
        tiny_qwen2_vl, "fp8_tensor", 8, {**fp8_on, "fp8_scaling": "tensor"}
    )
    narrow_kept, _ = logged_training_run(
        tiny_qwen2_vl, "fp8_default_width", 8, {**fp8_on, "fp8_min_features": 2048}
    )

    assert plain["fp8_base_layers"] == 0
    assert fp8["engine"] == train_engine and fp8["fp8_base_layers"] > 0
    assert len(fp8_losses) == len(plain_losses) == 3
    assert fp8_losses != plain_losses  # float8 rounding changes the numbers a little
    assert fp8_losses == pytest.approx(plain_losses, rel=2e-2)
    assert tensorwise["fp8_base_layers"] == fp8["fp8_base_layers"]
    assert narrow_kept["fp8_base_layers"] == 0
    assert tensorwise_losses == pytest.approx(plain_losses, rel=2e-2)
