"""Unsloth's fused LoRA SwiGLU MLP for the language model of a vision-language model.

For language models, Unsloth replaces each decoder MLP's forward with its own autograd
function (`unsloth.kernels.apply_lora_mlp_swiglu`: dequantise + matmul + LoRA per projection,
a Triton SwiGLU, and a hand-written backward). FastVisionModel does not: a vision model's
language MLP runs through PEFT's LoRA layers and transformers' `down(act(gate(x)) * up(x))`.
Measured at the 7B shape (width 18,944, 28 layers, batch 4, 448 px; docs/benchmarks.md run 11),
that path keeps three tensors of the MLP's width per token and layer for the backward
(1.25 GiB each over the 28 layers); Unsloth's function keeps two (gate and up) and recomputes
the SwiGLU in the backward: the peak went from 13.92 to 12.60 GiB, and the step was a little
faster (fewer kernels per MLP).

`recompute=True` goes one step further (`recomputing_lora_mlp`): the autograd function keeps only
the MLP's input and recomputes gate and up (two GEMMs with their LoRA terms) in the backward,
where Unsloth's backward dequantises those weights anyway; at the 7B shape the peak went from
12.60 to 10.23 GiB at batch 4 with no measurable cost there (the GPU idles most of that step;
runs 12-13).

Only MLPs Unsloth's own patch would take: gate/up/down all LoRA-wrapped, no bias, SiLU, and
the adapter without dropout (Unsloth's kernel draws no dropout masks). The vision tower's MLPs
are left alone. The Unsloth engine applies it (GPU: the kernel is Triton).
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from typing import Any

from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)


def _silu_classes() -> tuple[type, ...]:
    """torch's SiLU and transformers' own (ACT2CLS["silu"], what hidden_act "silu" builds)."""
    import torch
    from transformers.activations import ACT2CLS

    theirs = ACT2CLS.get("silu", torch.nn.SiLU)
    return (torch.nn.SiLU, theirs[0] if isinstance(theirs, tuple) else theirs)


def _fusable(mlp: Any) -> bool:
    """gate/up/down projections, each LoRA-wrapped (PEFT) without bias or dropout, and SiLU."""
    import torch

    projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None or not hasattr(p, "lora_A") for p in projections):
        return False
    if not isinstance(getattr(mlp, "act_fn", None), _silu_classes()):
        return False
    for p in projections:
        if getattr(p, "base_layer", p).bias is not None:
            return False
        if any(
            not isinstance(d, torch.nn.Identity) for d in getattr(p, "lora_dropout", {}).values()
        ):
            return False
        if getattr(p, "use_dora", {}) and any(p.use_dora.values()):
            return False
    return True


def language_mlps(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the language model's MLPs, outside the vision tower (per the family table)."""
    from vlm_ray.models.families import family_by_name

    family = family_by_name(unwrapped(model).config.model_type)
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.endswith(".mlp") and not family.in_vision_tower(name)
    ]


def recomputing_lora_mlp() -> Callable[..., Any]:
    """An MLP forward like Unsloth's apply_lora_mlp_swiglu whose autograd keeps only the input.

    Built on call from Unsloth's own pieces (matmul_lora, its SwiGLU kernels, LoRA_MLP's
    backward), so it needs Unsloth and a GPU. Any MLP the plain kernel would not take as is
    (dropout, LoRA bias, several adapters, DoRA) goes to apply_lora_mlp_swiglu unchanged.
    """
    from types import SimpleNamespace

    import torch
    from unsloth.kernels import fast_lora
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel
    from unsloth.kernels.utils import (
        matmul_lora,
        torch_amp_custom_bwd,
        torch_amp_custom_fwd,
    )

    class RecomputingLoRAMLP(torch.autograd.Function):
        """down(silu(gate(X)) * up(X)) with LoRA on all three; saves X, recomputes gate/up."""

        @staticmethod
        @torch_amp_custom_fwd
        def forward(ctx, X, *weights):
            gateW, gateQ, gateA, gateB, gateS, upW, upQ, upA, upB, upS = weights[:10]
            downW, downQ, downA, downB, downS = weights[10:]
            e = matmul_lora(X, gateW, gateQ, gateA, gateB, gateS)
            g = matmul_lora(X, upW, upQ, upA, upB, upS)
            out = matmul_lora(swiglu_fg_kernel(e, g), downW, downQ, downA, downB, downS)
            ctx.frozen = (gateW, gateQ, gateS, upW, upQ, upS, downW, downQ, downS)
            ctx.save_for_backward(gateA, gateB, upA, upB, downA, downB, X)
            return out

        @staticmethod
        @torch_amp_custom_bwd
        def backward(ctx, dY):
            gateA, gateB, upA, upB, downA, downB, X = ctx.saved_tensors
            gateW, gateQ, gateS, upW, upQ, upS = ctx.frozen[:6]
            e = matmul_lora(X, gateW, gateQ, gateA, gateB, gateS)
            g = matmul_lora(X, upW, upQ, upA, upB, upS)
            # LoRA_MLP's own backward, handed what its forward would have saved.
            saved = SimpleNamespace(
                custom_saved_tensors=(*ctx.frozen, swiglu_DWf_DW_dfg_kernel),
                saved_tensors=(gateA, gateB, upA, upB, downA, downB, X, e, g, None, None, None),
                inplace=False,
                dropout_p=(0.0, 0.0, 0.0),
                biases=(False, False, False),
                _fwd_used_autocast=ctx._fwd_used_autocast,
                _dtype=ctx._dtype,
            )
            # Its inputs: X, the 15 weights, then 7 arguments that take no gradient.
            return fast_lora.LoRA_MLP.backward(saved, dY)[:16]

    def forward(self, X):
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        plain = not any(
            fast_lora._has_multiple_active_adapters(p)
            or fast_lora._has_active_dora_adapter(p)
            or fast_lora._has_activation_fake_quantizer(p)
            for p in projections
        )
        extras = fast_lora._lora_dropout_and_bias(projections, X) if plain else None
        if extras is None or extras[0] is not None or any(b is not None for b in extras[1]):
            return fast_lora.apply_lora_mlp_swiglu(self, X, inplace=False)
        weights = [w for p in projections for w in fast_lora.get_lora_parameters(p)]
        return fast_lora._apply(RecomputingLoRAMLP, X, *weights)

    return forward


def enable_fused_lora_mlp(
    model: Any, forward: Callable[..., Any] | None = None, recompute: bool = False
) -> int:
    """Give every fusable language MLP `forward` (default: Unsloth's apply_lora_mlp_swiglu,
    not in place; with `recompute`, recomputing_lora_mlp()).

    Returns how many MLPs were patched (0 for full fine-tuning: no LoRA layers). `forward` is a
    parameter so the selection can be checked without a GPU.
    """
    if forward is None and recompute:
        forward = recomputing_lora_mlp()
    if forward is None:
        from unsloth.kernels import apply_lora_mlp_swiglu

        # Not in place: its backward would write the input's gradient over the saved input,
        # which the layer norm before it may still need (Unsloth's own models use its norm).
        forward = functools.partial(apply_lora_mlp_swiglu, inplace=False)
    found = language_mlps(model)
    patched = 0
    for _, mlp in found:
        if _fusable(mlp):
            mlp.forward = types.MethodType(forward, mlp)
            patched += 1
    if patched:
        log.info(
            "language MLP: Unsloth's fused LoRA SwiGLU in %d of %d layers", patched, len(found)
        )
    elif found:
        log.info("language MLP: left on PEFT's LoRA layers (not fusable: bias, dropout or no LoRA)")
    return patched
