"""LoRA layers run as one autograd function each (spec train.fused_lora), for training.

PEFT runs a LoRA layer as separate modules: the (dequantised) base layer, dropout, lora_A,
lora_B, a scale and an add, each a Python call, an op dispatch and a node of the autograd graph,
and again in the gradient checkpoint's recomputation and in backward. With LoRA on every linear
layer of a 7B vision-language model that is ~9,600 kernel launches per step at batch 4, and the
step is bound by the CPU issuing them (docs/benchmarks.md, training run 4). Here a layer is one
`torch.autograd.Function`: dequantise, base GEMM (+ bias), x A^T, and B's product added onto
the base output in place (one addmm); in backward the dequantisation again (no dense weight is
kept) and the five GEMMs the gradients need, as Unsloth's LoRA_W does for its text models'
projections.

Only plain LoRA is fused: one active adapter, not merged, no dropout, no DoRA or other variant,
no trainable bias; a layer that is anything else at call time runs PEFT's own forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# PEFT's LoRA wrappers of a dense or a bitsandbytes 4-bit linear layer (8-bit keeps its own path)
_FUSABLE = {"Linear", "Linear4bit"}


def dense_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense tensor: dequantised when 4-bit, the weight itself otherwise."""
    weight = base_layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's where it is on, else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # skips the dispatch of a no-op .to(): this module exists to issue fewer ops
    return t if t.dtype == dtype else t.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, with gradients for x, A and B only (W and b are frozen).

    Computes in compute_dtype(x) with autocast off inside, so that every operand has one dtype
    (LoRA weights are float32 over 4-bit layers) and backward repeats forward's precision.
    Every product is a 2-D mm/addmm on the flattened tokens (torch.matmul would add a dispatch).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        base_layer: torch.nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
            weight = _as(dense_weight(base_layer), dtype)
            bias = base_layer.bias
            out = (
                torch.mm(x2, weight.t())
                if bias is None
                else torch.addmm(_as(bias, dtype), x2, weight.t())
            )
            xa = torch.mm(x2, _as(lora_a, dtype).t())  # tokens x r: small, kept for B's gradient
            out.addmm_(xa, _as(lora_b, dtype).t(), alpha=scaling)
        ctx.base_layer = base_layer
        ctx.scaling = scaling
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        s, dtype = ctx.scaling, x2.dtype
        with torch.autocast(x2.device.type, enabled=False):
            dy = _as(grad_out.reshape(-1, grad_out.shape[-1]), dtype)
            a = _as(lora_a, dtype)
            dy_b = torch.mm(dy, _as(lora_b, dtype))  # tokens x r
            grad_a = _as(torch.mm(dy_b.t(), x2).mul_(s), lora_a.dtype)
            grad_b = _as(torch.mm(dy.t(), xa).mul_(s), lora_b.dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                weight = _as(dense_weight(ctx.base_layer), dtype)
                grad_x = torch.mm(dy, weight).addmm_(dy_b, a, alpha=s)
                grad_x = _as(grad_x.view(ctx.x_shape), ctx.x_dtype)
        return grad_x, None, grad_a, grad_b, None


def plain_lora_adapter(layer: Any) -> str | None:
    """The one active adapter of a LoRA layer that can run fused now, or None (PEFT's path)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    bias = layer.get_base_layer().bias
    if bias is not None and bias.requires_grad:
        return None
    return name


class _FusedLoraForward:
    """Mixed into a LoRA layer's class: forward through LoraLinearFunction when plain LoRA."""

    # Eager on purpose: a compiled caller gets a graph break here rather than tracing bitsandbytes.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs or not x.is_floating_point() else plain_lora_adapter(self)
        if name is None:
            return super().forward(x, *args, **kwargs)
        return LoraLinearFunction.apply(
            x,
            self.get_base_layer(),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
        )


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    # Same name and module as PEFT's class: Unsloth and PEFT tell layers apart by class name
    # (4-bit vs dense) and module path.
    if cls not in _FUSED_CLASSES:
        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _FUSED_CLASSES[cls] = type(
            cls.__name__, (_FusedLoraForward, cls), {**names, "_fused_lora": True}
        )
    return _FUSED_CLASSES[cls]


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Run every PEFT LoRA linear layer of `model` through LoraLinearFunction; returns how many.

    Each layer keeps its modules, parameters and state dict (saving, merging and resuming are
    unchanged); its class becomes a subclass of PEFT's whose forward is fused and which falls
    back to PEFT's at any call that is not plain LoRA. A copy of the model stays fused.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, LoraLayer) and cls.__name__ in _FUSABLE:
            if not getattr(cls, "_fused_lora", False):
                module.__class__ = _fused_class(cls)
            count += 1
    log.info("train.fused_lora: %d LoRA layers run as one autograd function each", count)
    return count
