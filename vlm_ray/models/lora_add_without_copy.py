"""LoRA's product added to its base layer's output without first copying that output
(spec train.lora_add_without_copy).

Why: Unsloth's PEFT forward (unsloth_zoo.compiler's COMPILED_LORA_FORWARD) adds the adapter's
product with one out-of-place `torch.addmm(result, xA, B.T, beta=1)`. cuBLAS reads the summand
from the output buffer, so ATen first copies `result` into a fresh output: a device-to-device
copy of the layer's whole output per LoRA layer and call. Inductor does the same inside compiled
code: it runs such an addmm as an extern kernel (at::addmm_out), and unfuses only a bias-like
(broadcast) summand into a pointwise add. At 7B, batch 32, 448 px, run 25's profile counted 523
device-to-device copies per step, 51 ms of the ~1,000 ms step (docs/benchmarks.md); every
language layer's q/k/v/o/gate/up/down output and every vision layer's would be one.

How, in the two places Unsloth's forward runs:
- eager code: `result` is a fresh tensor that nothing else reads (the base GEMM saves its input
  for the backward, not its output), so `result.addmm_(xA, B.T, alpha=scaling)` gives the same
  sum in the same cuBLAS call, without the copy. Only where autograd records it as the addmm it
  is: a 2-D output that is no view (the vision tower's patches). A change made through a view
  is recorded as CopySlices, whose backward copies the gradient three times; so a 3-D output
  (which addmm_ needs as a 2-D view), a view, a leaf that needs gradients, an inference tensor
  outside inference mode or a non-contiguous output take Unsloth's own lora_forward, unless
  nothing is recorded (no grad), where any of them is added in place.
- code that torch.compile traces (Unsloth compiles its modules with fullgraph=False, their
  LoRA layers inside): `result + (scaling * xA) @ B.T`, a matmul and a pointwise add,
  which Inductor fuses into the add's consumer (the rotary embedding, SiLU times up, the
  residual add). The scaling goes on the narrow (tokens, r) factor, so the backward scales no
  full-width gradient either. A 2-D sum is made in 3-D: Inductor's post-grad passes rewrite
  "2-D tensor + mm" into addmm, the copy again (bench/lora_add.py reports whether the compiled
  forward calls addmm).

Measured (docs/benchmarks.md): run 26 (one H100, 7B, batch 32), the eager half alone: 32.13
samples/s against Unsloth's add at 32.34, no gain (Dynamo traces nearly every LoRA call there).
Run 27, both halves: 33.77 and 33.76 against 32.45 and 32.51 (1.04x); the step's device-to-
device copies fell from 523 to 263 (51 to 23 ms), and the 192 copies left in the vision MLPs'
backward were CopySlices of the eager half's view (since fixed, not yet measured). Run 27
also trained to a different loss (9.636 against 9.703, apart from the second step on). Run 28
(one H100) compared both adds with float32 (docs/benchmarks.md): in a
7B-shaped decoder MLP ours compiled is as close to float32 as Unsloth's or closer (with B
non-zero, the output 0.0039 from float32 against 0.0047); a tiny Qwen2-VL trained six steps
follows float32's losses with ours compiled, where bf16 op by op and Unsloth's add compiled
part from them, on the GPU as on CPU (six seeds on CPU: mean |loss - float32's| 0.96e-3
against 3.05e-3 and 2.90e-3); and at 7B, Unsloth's add compiled logs the eager run's losses
(12.347 and 12.335 at the second step) where ours logs 12.147 - the tiny model's pattern, in
which the odd one out is the one near float32. Why: the bf16 paths round each layer's output,
LoRA's small product in it, to bf16 before the next op reads it; Inductor fuses our pointwise add
into its consumer and rounds the fused chain once. Told to round every bf16 intermediate as eager
code does (emulate_precision_casts), ours compiled trains as eager again (a CPU test,
tests/test_bench_lora_add_training_split.py). So the spec turns this on by default.
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

_PATCHED_MARK = "_vlm_ray_lora_add_without_copy"


@dataclass
class LoraAddCount:
    """Eager calls only (Dynamo would guard on a counter it saw change, and recompile per
    call): how many added in place, how many went to Unsloth's forward instead. Under
    train.cuda_graphs a replay runs no Python, so there only the captures are counted."""

    in_place: int = 0
    fallback: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"in_place": self.in_place, "fallback": self.fallback}


def can_add_in_place(result: torch.Tensor) -> bool:
    """Whether LoRA's product can go into `result` in place at no cost elsewhere: autograd
    allows the change, and where it records it, records it without CopySlices."""
    if not result.is_contiguous():
        return False
    if torch.is_inference(result) and not torch.is_inference_mode_enabled():
        return False  # an inference tensor cannot be changed outside inference mode
    if not torch.is_grad_enabled() and not result.requires_grad:
        # nothing is recorded (reentrant checkpointing's first forward, inference): a view too,
        # and a 3-D output through a 2-D view of itself
        return True
    if result.is_leaf and result.requires_grad:
        return False  # autograd refuses in-place changes to a leaf that requires grad
    # Recorded: autograd records an in-place change of a view as CopySlices, whose backward
    # copies the whole gradient three times (copy, clone, copy back) where Unsloth's add copied
    # the output once (run 27: 192 such copies per step at 7B, 21 ms, in the vision MLPs). Only
    # a 2-D tensor that is no view takes addmm_ without one; a 3-D output would need a 2-D view.
    return result.dim() == 2 and not result._is_view()


def lora_add_traced(
    result: torch.Tensor, lora_A: Any, lora_B: Any, dropout: Any, x: torch.Tensor, scaling: float
) -> torch.Tensor:
    """result + scaling * (x A^T) B^T as a matmul and a pointwise add, for Inductor to fuse the
    add into its consumer; an addmm it would run as an extern kernel that copies `result`."""
    dtype = result.dtype
    xA = dropout(x).to(dtype) @ lora_A.weight.to(dtype).t()
    if scaling != 1:  # a constant while tracing; at 1 (lora_alpha == r) no kernel is spent on it
        xA = xA * scaling
    b_t = lora_B.weight.to(dtype).t()
    if result.dim() == 2:
        # Inductor rewrites "2-D tensor + mm(a, b)" back into the copying addmm (its post-grad
        # addmm pattern); in 3-D the matmul's view keeps the add apart (the vision tower's
        # patches are 2-D, the language model's tokens 3-D).
        output = (result.unsqueeze(0) + xA.unsqueeze(0) @ b_t).squeeze(0)
    else:
        output = result + xA @ b_t
    if lora_B.bias is not None:
        output = output + lora_B.bias.to(dtype) * scaling
    return output


def make_lora_forward_without_copy(original: LoraForward, count: LoraAddCount) -> LoraForward:
    """A lora_forward with Unsloth's signature: traced, lora_add_traced; eager, the in-place add
    where can_add_in_place, else `original`."""

    def lora_forward(
        result: torch.Tensor,
        lora_A: Any,
        lora_B: Any,
        dropout: Any,
        x: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return lora_add_traced(result, lora_A, lora_B, dropout, x, scaling)
        if not can_add_in_place(result):
            count.fallback += 1
            return original(result, lora_A, lora_B, dropout, x, scaling)
        dtype = result.dtype
        # the same operands, in the same dtype, as Unsloth's lora_forward
        xA = dropout(x).to(dtype) @ lora_A.weight.to(dtype).t()
        # 2-D: result itself; 3-D only where nothing is recorded (can_add_in_place), so a 2-D
        # view of it costs nothing
        rows = result if result.dim() == 2 else result.view(-1, result.shape[-1])
        rows.addmm_(xA.view(-1, xA.shape[-1]), lora_B.weight.to(dtype).t(), alpha=scaling)
        count.in_place += 1
        bias = lora_B.bias
        if bias is not None:
            return torch.add(result, bias.to(dtype), alpha=scaling)
        return result

    setattr(lora_forward, _PATCHED_MARK, original)
    return lora_forward


def _lora_layer_classes() -> list[type]:
    """Every imported PEFT LoRA layer class (Linear, bitsandbytes' Linear4bit/8bitLt, ...)."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    if layer is None:
        return []
    found, todo = [], [layer.LoraLayer]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def _unsloth_lora_forward_namespaces() -> list[dict[str, Any]]:
    """The module namespaces where Unsloth's patched PEFT forwards look up lora_forward: one per
    LoRA layer class Unsloth rewrote (16-bit Linear, 4-bit, 8-bit each get their own module)."""
    namespaces: dict[int, dict[str, Any]] = {}
    for cls in _lora_layer_classes():
        forward = cls.__dict__.get("forward")
        if getattr(forward, "__name__", None) != "unsloth_forward":
            continue
        namespace = forward.__globals__
        if callable(namespace.get("lora_forward")):
            namespaces[id(namespace)] = namespace
    return list(namespaces.values())


def set_lora_add_without_copy(enabled: bool) -> LoraAddCount | None:
    """Switch Unsloth's PEFT LoRA forwards to the add without a copy (or back); its counts, or
    None when off.

    Process-wide, like Unsloth's own patch: every PEFT LoRA layer of a class Unsloth rewrote
    goes through that class's lora_forward. None (logged when enabling) where Unsloth
    has not patched PEFT.
    """
    namespaces = _unsloth_lora_forward_namespaces()
    if not namespaces:
        if enabled:  # on by default: say so, without alarm
            log.info(
                "train.lora_add_without_copy: PEFT's LoRA forwards are not Unsloth's; left as "
                "they are"
            )
        return None
    count = LoraAddCount() if enabled else None
    for namespace in namespaces:
        current = namespace["lora_forward"]
        original = getattr(current, _PATCHED_MARK, current)
        namespace["lora_forward"] = (
            make_lora_forward_without_copy(original, count) if count is not None else original
        )
    if count is not None:
        log.info(
            "train.lora_add_without_copy: LoRA products are added in place in eager code and as "
            "fusable adds in compiled code (%d LoRA layer classes)",
            len(namespaces),
        )
    return count


def lora_add_counts(count: LoraAddCount | None) -> dict[str, Any]:
    """The run summary's entry: {} when the add without a copy was off."""
    return {} if count is None else {"lora_add_without_copy": count.as_dict()}
