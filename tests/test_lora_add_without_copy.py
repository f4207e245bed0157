"""train.lora_add_without_copy (vlm_ray/models/lora_add_without_copy.py): in eager code LoRA's
product is added into the base layer's output buffer, with the same values and gradients as
Unsloth's out-of-place addmm, falling back to that addmm wherever autograd forbids the in-place
change; in code torch.compile traces it is a matmul and an add, with no addmm of the output and
no recompiling.

Unsloth cannot run on CPU, so its forward's add is stood in for by bench/lora_add.py's
`unsloth_lora_forward`: COMPILED_LORA_FORWARD's arithmetic (unsloth_zoo 2026.10.7, torch >= 2.10),
the same operands in the same order. What Inductor makes of both is checked by
tests/test_bench_lora_add.py. The switch of Unsloth's patched PEFT forward is checked on the GPU
(tests/test_lora_add_without_copy_gpu.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from bench.lora_add import unsloth_lora_forward
from vlm_ray.models.fp8_frozen_linear import Float8FrozenLinear
from vlm_ray.models.lora_add_without_copy import (
    LoraAddCount,
    lora_add_counts,
    make_lora_forward_without_copy,
    set_lora_add_without_copy,
)


def lora_layer(base: torch.nn.Module, seed: int = 0, alpha: int = 16) -> LoraLinear:
    """A PEFT LoRA layer (r=8, scaling alpha/8) over `base`, with a nonzero B (PEFT starts it
    at zero)."""
    config = LoraConfig(r=8, lora_alpha=alpha)
    layer = LoraLinear(base, adapter_name="default", config=config, r=8, lora_alpha=alpha)
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
    # changing in place, until the layer reshaped outside it; 2-D, it is no view at all now
    "float8": float8_lora_layer,
}


@pytest.mark.parametrize("base", LAYERS)
def test_the_in_place_add_gives_unsloths_output_and_gradients_in_the_base_output(base: str):
    # 2-D rows, as the vision tower's patches come (the language model's 3-D tokens are traced)
    layer = LAYERS[base]()
    x = torch.randn(15, 64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(15, 48, generator=torch.Generator().manual_seed(3))
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)

    _, expected, expected_grads = forward_and_grads(layer, unsloth_lora_forward, x, grad)
    result, out, grads = forward_and_grads(layer, in_place, x, grad)

    assert out.data_ptr() == result.data_ptr()  # written into the base output, no copy
    # recorded as the addmm it is: no CopySlices, whose backward would copy the gradient 3 times
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    assert count.as_dict() == {"in_place": 1, "fallback": 0}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want, name in zip(grads, expected_grads, ("x", "lora_A", "lora_B"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("base", LAYERS)
def test_where_autograd_would_record_a_view_s_change_unsloths_add_runs(base: str):
    # Run 27's profile: addmm_ through a 2-D view of the output was recorded as CopySlices,
    # 3 copies of the gradient in the backward for the 1 copy saved in the forward. A 3-D
    # output needs such a view, and so does a tensor that is a view already.
    layer = LAYERS[base]()
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3))

    _, expected, expected_grads = forward_and_grads(layer, unsloth_lora_forward, x, grad)
    result, out, grads = forward_and_grads(layer, in_place, x, grad)
    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    rows = torch.randn(6, 48, requires_grad=True) * 1.0
    view_out = in_place(rows.view(2, 3, 48).view(6, 48), a, b, drop, torch.randn(6, 64), 1.0)

    assert out.data_ptr() != result.data_ptr()
    assert "CopySlices" not in type(out.grad_fn).__name__
    assert "CopySlices" not in type(view_out.grad_fn).__name__
    assert count.as_dict() == {"in_place": 0, "fallback": 2}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_lora_B_bias_is_added_scaled_as_unsloth_adds_it():
    layer = lora_layer(frozen_base(48, 64, bias=True))
    layer.lora_B["default"].bias = torch.nn.Parameter(torch.randn(48))
    x, grad = torch.randn(4, 64), torch.randn(4, 48)
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, LoraAddCount())

    _, expected, _ = forward_and_grads(layer, unsloth_lora_forward, x, grad)
    _, out, _ = forward_and_grads(layer, in_place, x, grad)

    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_tensors_autograd_forbids_changing_or_that_are_not_contiguous_take_unsloths_add():
    layer = lora_layer(frozen_base(48, 64, bias=False))
    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    s = layer.scaling["default"]
    x = torch.randn(6, 64)
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)

    leaf = torch.randn(6, 48, requires_grad=True)
    out = in_place(leaf, a, b, drop, x, s)
    assert out.data_ptr() != leaf.data_ptr()
    non_contiguous = torch.randn(48, 6).t()
    before = non_contiguous.clone()
    out = in_place(non_contiguous, a, b, drop, x, s)
    torch.testing.assert_close(non_contiguous, before, rtol=0, atol=0)  # left as it was

    assert count.as_dict() == {"in_place": 0, "fallback": 2}
    torch.testing.assert_close(out, unsloth_lora_forward(before, a, b, drop, x, s))


class _ReshapedInside(torch.autograd.Function):
    """x @ W.T reshaped to 3-D before it is returned, as bitsandbytes' 8-bit matmul does: a view
    made inside a custom Function, which autograd forbids changing in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


def test_a_view_made_inside_a_custom_function_takes_unsloths_add_instead_of_failing():
    layer = lora_layer(frozen_base(48, 64, bias=False))
    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    s = layer.scaling["default"]
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)
    x = torch.randn(2, 3, 64, requires_grad=True)

    result = _ReshapedInside.apply(x, layer.base_layer.weight)
    out = in_place(result, a, b, drop, x, s)
    out.sum().backward()

    assert count.as_dict() == {"in_place": 0, "fallback": 1}
    expected = unsloth_lora_forward(result.detach(), a, b, drop, x.detach(), s)
    torch.testing.assert_close(out.detach(), expected)


def test_with_gradients_off_even_a_view_is_added_in_place():
    # reentrant checkpointing's first forward runs under no_grad: nothing is recorded there
    layer = lora_layer(frozen_base(48, 64, bias=False))
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)
    with torch.no_grad():
        x = torch.randn(2, 3, 64)
        result = _ReshapedInside.apply(x, layer.base_layer.weight)
        args = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"])
        out = in_place(result, *args, x, layer.scaling["default"])
    assert out.data_ptr() == result.data_ptr()
    assert count.in_place == 1


def test_under_inference_mode_the_add_is_in_place_too():
    layer = lora_layer(frozen_base(48, 64, bias=True))
    count = LoraAddCount()
    in_place = make_lora_forward_without_copy(unsloth_lora_forward, count)
    with torch.inference_mode():
        x = torch.randn(2, 64)
        result = layer.base_layer(x)
        args = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"])
        out = in_place(result, *args, x, layer.scaling["default"])
    assert out.data_ptr() == result.data_ptr()
    assert count.in_place == 1


def test_without_unsloths_patched_peft_forward_the_switch_changes_nothing(caplog):
    forward_before = LoraLinear.forward
    with caplog.at_level(logging.INFO, logger="vlm_ray.models.lora_add_without_copy"):
        assert set_lora_add_without_copy(True) is None
    assert LoraLinear.forward is forward_before
    assert "are not Unsloth's" in caplog.text
    assert set_lora_add_without_copy(False) is None
    assert lora_add_counts(None) == {}
    assert lora_add_counts(LoraAddCount(3, 1)) == {
        "lora_add_without_copy": {"in_place": 3, "fallback": 1}
    }


def compiled_lora_layer_forward(layer: LoraLinear, lora_forward):
    """Unsloth's forward for one adapter (base layer, then lora_forward) under torch.compile on
    CPU (aot_eager: Dynamo and AOTAutograd, no code generated): the callable, the ATen forward
    graphs AOTAutograd made, and how many graphs Dynamo compiled."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    s = layer.scaling["default"]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return lora_forward(layer.base_layer(x), a, b, drop, x, s)

    torch._dynamo.reset()

    def backward(gm: torch.fx.GraphModule, _inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=backward)
    return torch.compile(forward, backend=backend, dynamic=False), graphs


def aten_ops(graph: torch.fx.GraphModule) -> set[str]:
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("rows", [(4, 6), (24,)], ids=["tokens 3-D", "patches 2-D"])
@pytest.mark.parametrize("alpha", [16, 8])
def test_traced_it_is_a_matmul_and_an_add_that_compile_once_and_match_unsloths(
    alpha: int, rows: tuple[int, ...]
):
    layer = lora_layer(frozen_base(48, 64, bias=False), alpha=alpha)
    count = LoraAddCount()
    forward, graphs = compiled_lora_layer_forward(
        layer, make_lora_forward_without_copy(unsloth_lora_forward, count)
    )
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(*rows, 64, generator=g)
        grad = torch.randn(*rows, 48, generator=g)
        _, expected, expected_grads = forward_and_grads(layer, unsloth_lora_forward, x, grad)
        x = x.requires_grad_(True)
        out = forward(x)
        grads = torch.autograd.grad(
            out, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight), grad
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    assert len(graphs) == 1  # compiled once: nothing it reads changes between calls
    ops = aten_ops(graphs[0])
    assert "aten.addmm.default" not in ops, ops  # Inductor would copy the base output for one
    assert {"aten.mm.default", "aten.add.Tensor"} <= ops
    # scaling 1 (lora_alpha == r) spends no kernel on scaling
    assert ("aten.mul.Tensor" in ops) == (layer.scaling["default"] != 1)
    assert count.as_dict() == {"in_place": 0, "fallback": 0}  # eager calls only


def test_traced_unsloths_own_add_is_the_addmm_that_copies():
    # The contrast that makes the test above mean something: the same trace of Unsloth's add.
    layer = lora_layer(frozen_base(48, 64, bias=False))
    forward, graphs = compiled_lora_layer_forward(layer, unsloth_lora_forward)
    forward(torch.randn(4, 6, 64, requires_grad=True))
    assert "aten.addmm.default" in aten_ops(graphs[0])
