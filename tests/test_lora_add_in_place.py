"""train.lora_add_in_place (vlm_ray/models/lora_add_in_place.py): LoRA's product is added into the
base layer's output buffer, with the same values and gradients as Unsloth's out-of-place addmm,
and falls back to that addmm wherever autograd forbids the in-place change.

Unsloth cannot run on CPU, so its forward's add is stood in for by `unsloth_lora_forward` below:
COMPILED_LORA_FORWARD's arithmetic (unsloth_zoo 2026.10.7, torch >= 2.10), the same operands in
the same order. The switch of Unsloth's patched PEFT forward is checked on the GPU
(tests/test_lora_add_in_place_gpu.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from vlm_ray.models.fp8_frozen_linear import Float8FrozenLinear
from vlm_ray.models.lora_add_in_place import (
    LoraAddCount,
    lora_add_counts,
    make_lora_forward_in_place,
    set_lora_add_in_place,
)


def unsloth_lora_forward(result, lora_A, lora_B, dropout, x, scaling):
    """Unsloth's lora_forward: result + scaling * (x A^T) B^T as one out-of-place addmm."""
    dtype = result.dtype
    xA = dropout(x).to(dtype) @ lora_A.weight.to(dtype).t()
    shape = result.shape
    output = torch.addmm(
        result.view(-1, shape[-1]),
        xA.view(-1, xA.shape[-1]),
        lora_B.weight.to(dtype).t(),
        alpha=scaling,
        beta=1,
    ).view(shape)
    if lora_B.bias is not None:
        output = torch.add(output, lora_B.bias.to(dtype), alpha=scaling)
    return output


def lora_layer(base: torch.nn.Module, seed: int = 0) -> LoraLinear:
    """A PEFT LoRA layer (r=8, alpha=16) over `base`, with a nonzero B (PEFT starts it at zero)."""
    config = LoraConfig(r=8, lora_alpha=16)
    layer = LoraLinear(base, adapter_name="default", config=config, r=8, lora_alpha=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return layer


def frozen_base(out_features: int, in_features: int, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)


def forward_and_grads(layer: LoraLinear, lora_forward, x: torch.Tensor, grad: torch.Tensor):
    """What Unsloth's unsloth_forward does for one adapter, then the gradients of x, A and B."""
    x = x.detach().clone().requires_grad_(True)
    result = layer.base_layer(x)
    out = lora_forward(
        result,
        layer.lora_A["default"],
        layer.lora_B["default"],
        layer.lora_dropout["default"],
        x,
        layer.scaling["default"],
    )
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = torch.autograd.grad(out, (x, a, b), grad)
    return result, out, grads


def float8_lora_layer() -> LoraLinear:
    """A LoRA layer whose base was then made float8, as train.fp8 converts them (after PEFT,
    which would otherwise cast the adapters to the base weight's 1-byte dtype)."""
    layer = lora_layer(frozen_base(48, 64, bias=False))
    layer.base_layer = Float8FrozenLinear(layer.base_layer)
    return layer


LAYERS = {
    "linear with bias": lambda: lora_layer(frozen_base(48, 64, bias=True)),
    "linear": lambda: lora_layer(frozen_base(48, 64, bias=False)),
    # its output came back as a view made inside a custom Function, which autograd forbids
    # changing in place, until the layer reshaped outside it
    "float8": float8_lora_layer,
}


@pytest.mark.parametrize("base", LAYERS)
def test_the_in_place_add_gives_unsloths_output_and_gradients_in_the_base_output(base: str):
    layer = LAYERS[base]()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3))
    count = LoraAddCount()
    in_place = make_lora_forward_in_place(unsloth_lora_forward, count)

    _, expected, expected_grads = forward_and_grads(layer, unsloth_lora_forward, x, grad)
    result, out, grads = forward_and_grads(layer, in_place, x, grad)

    assert out.data_ptr() == result.data_ptr()  # written into the base output, no copy
    assert count.as_dict() == {"in_place": 1, "fallback": 0}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want, name in zip(grads, expected_grads, ("x", "lora_A", "lora_B"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_lora_B_bias_is_added_scaled_as_unsloth_adds_it():
    layer = lora_layer(frozen_base(48, 64, bias=True))
    layer.lora_B["default"].bias = torch.nn.Parameter(torch.randn(48))
    x, grad = torch.randn(4, 64), torch.randn(4, 48)
    in_place = make_lora_forward_in_place(unsloth_lora_forward, LoraAddCount())

    _, expected, _ = forward_and_grads(layer, unsloth_lora_forward, x, grad)
    _, out, _ = forward_and_grads(layer, in_place, x, grad)

    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_tensors_autograd_forbids_changing_or_that_are_not_contiguous_take_unsloths_add():
    layer = lora_layer(frozen_base(48, 64, bias=False))
    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    s = layer.scaling["default"]
    x = torch.randn(6, 64)
    count = LoraAddCount()
    in_place = make_lora_forward_in_place(unsloth_lora_forward, count)

    leaf = torch.randn(6, 48, requires_grad=True)
    out = in_place(leaf, a, b, drop, x, s)
    assert out.data_ptr() != leaf.data_ptr()
    non_contiguous = torch.randn(48, 6).t()
    before = non_contiguous.clone()
    out = in_place(non_contiguous, a, b, drop, x, s)
    torch.testing.assert_close(non_contiguous, before, rtol=0, atol=0)  # left as it was

    assert count.as_dict() == {"in_place": 0, "fallback": 2}
    torch.testing.assert_close(out, unsloth_lora_forward(before, a, b, drop, x, s))


def test_under_inference_mode_the_add_is_in_place_too():
    layer = lora_layer(frozen_base(48, 64, bias=True))
    count = LoraAddCount()
    in_place = make_lora_forward_in_place(unsloth_lora_forward, count)
    with torch.inference_mode():
        x = torch.randn(2, 64)
        result = layer.base_layer(x)
        args = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"])
        out = in_place(result, *args, x, layer.scaling["default"])
    assert out.data_ptr() == result.data_ptr()
    assert count.in_place == 1


def test_without_unsloths_patched_peft_forward_the_switch_changes_nothing(caplog):
    forward_before = LoraLinear.forward
    with caplog.at_level(logging.WARNING, logger="vlm_ray.models.lora_add_in_place"):
        assert set_lora_add_in_place(True) is None
    assert LoraLinear.forward is forward_before
    assert "not Unsloth's" in caplog.text
    assert set_lora_add_in_place(False) is None
    assert lora_add_counts(None) == {}
    assert lora_add_counts(LoraAddCount(3, 1)) == {
        "lora_add_in_place": {"in_place": 3, "fallback": 1}
    }
