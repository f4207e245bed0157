"""LoRA's product added into its base layer's output in place (spec train.lora_add_in_place).

Why: Unsloth's PEFT forward (unsloth_zoo.compiler's COMPILED_LORA_FORWARD) adds the adapter's
product to the base layer's output with one out-of-place `torch.addmm(result, xA, B.T,
beta=1)`. cuBLAS reads the summand from the output buffer, so ATen first copies `result` into a
fresh output: one device-to-device copy of the layer's whole output per LoRA layer and call. At
7B, batch 32, 448 px that is every language layer's q/k/v/o/gate/up/down output and every vision
block's (twice, under checkpointing): run 25's profile counted 523 such copies per step, 51 ms of
the ~1,000 ms step (docs/benchmarks.md).

How: `result` is a fresh tensor that nothing else reads (the base GEMM saves its input for the
backward, not its output), so `result.addmm_(xA, B.T, alpha=scaling)` gives the same sum in the
same cuBLAS call without the copy; autograd records the same AddmmBackward. Where that is not
safe (a tensor autograd forbids changing in place, a non-contiguous one) or while torch.compile
traces (functionalization turns the in-place op back into addmm anyway), Unsloth's own
lora_forward runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

LoraForward = Callable[..., torch.Tensor]

_PATCHED_MARK = "_vlm_ray_lora_add_in_place"


@dataclass
class LoraAddCount:
    """How many LoRA products were added in place, and how many (outside compiled code) went to
    the original forward."""

    in_place: int = 0
    fallback: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"in_place": self.in_place, "fallback": self.fallback}


def can_add_in_place(result: torch.Tensor) -> bool:
    """Whether autograd lets `result` be changed in place and it can be viewed as (rows, out)."""
    if result.is_leaf and result.requires_grad:
        return False  # autograd refuses in-place changes to a leaf that requires grad
    if torch.is_inference(result) and not torch.is_inference_mode_enabled():
        return False  # an inference tensor cannot be changed outside inference mode
    return result.is_contiguous()


def make_lora_forward_in_place(original: LoraForward, count: LoraAddCount) -> LoraForward:
    """A lora_forward with Unsloth's signature that adds in place, else calls `original`."""

    def lora_forward(
        result: torch.Tensor,
        lora_A: Any,
        lora_B: Any,
        dropout: Any,
        x: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Not counted: Dynamo would guard on the counter's value and recompile per call.
            return original(result, lora_A, lora_B, dropout, x, scaling)
        if not can_add_in_place(result):
            count.fallback += 1
            return original(result, lora_A, lora_B, dropout, x, scaling)
        dtype = result.dtype
        # the same operands, in the same dtype, as Unsloth's lora_forward
        xA = dropout(x).to(dtype) @ lora_A.weight.to(dtype).t()
        result.view(-1, result.shape[-1]).addmm_(
            xA.view(-1, xA.shape[-1]), lora_B.weight.to(dtype).t(), alpha=scaling
        )
        count.in_place += 1
        bias = lora_B.bias
        if bias is not None:
            return torch.add(result, bias.to(dtype), alpha=scaling)
        return result

    setattr(lora_forward, _PATCHED_MARK, original)
    return lora_forward


def _unsloth_lora_forward_globals() -> dict[str, Any] | None:
    """The module namespace where Unsloth's patched PEFT Linear.forward looks up lora_forward."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    forward = getattr(getattr(layer, "Linear", None), "forward", None)
    if getattr(forward, "__name__", None) != "unsloth_forward":
        return None
    namespace = forward.__globals__
    return namespace if callable(namespace.get("lora_forward")) else None


def set_lora_add_in_place(enabled: bool) -> LoraAddCount | None:
    """Switch Unsloth's PEFT Linear forward to the in-place add (or back); its counts, or None.

    Process-wide, like Unsloth's own patch: every PEFT LoRA Linear goes through the one
    lora_forward. None (with a warning when enabling) where Unsloth has not patched PEFT.
    """
    namespace = _unsloth_lora_forward_globals()
    if namespace is None:
        if enabled:
            log.warning(
                "train.lora_add_in_place: PEFT's Linear.forward is not Unsloth's; left as it is"
            )
        return None
    current = namespace["lora_forward"]
    original = getattr(current, _PATCHED_MARK, current)
    if not enabled:
        namespace["lora_forward"] = original
        return None
    count = LoraAddCount()
    namespace["lora_forward"] = make_lora_forward_in_place(original, count)
    log.info(
        "train.lora_add_in_place: LoRA products are added into the base layers' outputs in place"
    )
    return count


def lora_add_counts(count: LoraAddCount | None) -> dict[str, Any]:
    """The run summary's entry: {} when the in-place add was off."""
    return {} if count is None else {"lora_add_in_place": count.as_dict()}
