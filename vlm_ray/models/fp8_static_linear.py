"""Linear layers as float8 GEMMs with calibrated input scales, for inference
(spec infer.fp8_scaling: static).

Why: with dynamic scaling (infer.fp8_scaling row or tensor) every call first reads the whole
activation to find its largest value, then reads it again to scale and cast it. At the 2B vision
tower's shape that scaling cost 1.65-1.69 ms per layer per row, against 0.55-0.57 ms for a cast
with a scale known beforehand, and one block's four linear layers took 20.8 ms with static
per-tensor scales against 31.3 with dynamic per-row ones (bench/vision_kernels.py on an H200,
docs/benchmarks.md inference run 11). Compiled, a static cast can also fuse into the norm or
activation that produces the layer's input.

How: before the layers are converted, a few calibration batches run through the bf16 model while
forward pre-hooks record each target layer's largest |input| (record_input_amax). A layer's input
scale is the smallest power of two that maps that amax into e4m3's range (static_input_scales),
so a calibrated value is never clipped and the cast of a value float8 holds is exact; at run
time a value beyond the calibrated range saturates at e4m3's largest value instead of becoming
inf. The weight is quantized once, one scale per tensor, as in train.fp8. The scales come from
data, so the infer stage keeps them as an artefact of the run (vlm_ray.infer.fp8_calibration):
every actor, and every re-run, uses the same ones.

vLLM and llm-compressor keep such static scales beside a checkpoint (`input_scale`); torchao has
them only as a prototype (torchao.prototype.quantization, 0.18), and the pieces here are the
ones train.fp8 already uses and tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlm_ray.models.fp8_frozen_linear import E4M3, Float8Weight, pow2_scale, saturating_cast
from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)


def cast_to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3, saturating (fp8_frozen_linear.saturating_cast)."""
    return saturating_cast(x, scale, E4M3)


_cast_compiled: Any = None


def _compiled_cast() -> Any:
    """cast_to_e4m3 under torch.compile: on CUDA one fused kernel instead of four passes over the
    activation where the layer runs eagerly (inside a compiled block it is traced inline anyway).
    Made when layers are converted, outside any traced region, as fp8_frozen_linear does."""
    global _cast_compiled
    if _cast_compiled is None:
        _cast_compiled = torch.compile(cast_to_e4m3, dynamic=True)
    return _cast_compiled


class Float8StaticLinear(Float8Weight):
    """An inference-only nn.Linear whose GEMM runs in float8 with a fixed input scale."""

    def __init__(self, linear: torch.nn.Linear, input_scale: float) -> None:
        super().__init__(linear)
        self.register_buffer(
            "input_scale",
            torch.tensor(input_scale, dtype=torch.float32, device=self.weight_bits.device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        # Compiled on CUDA; eager elsewhere (CPU compilation needs a C++ toolchain).
        xq = (_compiled_cast() if x.is_cuda else cast_to_e4m3)(rows, self.input_scale)
        out = torch._scaled_mm(
            xq,
            self.weight.t(),  # (in, out), column-major: what _scaled_mm wants on the right
            scale_a=self.input_scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"float8 static input_scale={self.input_scale.item():g}"
        )


@contextmanager
def record_input_amax(model: Any, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the largest |input| each named nn.Linear of `model` sees, by name.

    The maxima stay on the device (no sync per call); a layer no call reached has no entry.
    """
    base = unwrapped(model)
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def record(_module: Any, args: tuple) -> None:
            seen = args[0].detach().abs().amax().float()
            amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)

        return record

    handles = [base.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()


def static_input_scales(amax: dict[str, float]) -> dict[str, float]:
    """Per layer, the smallest power of two s with amax / s <= 448 (e4m3's largest value).

    A layer whose calibration inputs were all zero gets 1.0: there is no range to fit, and a
    tiny scale would saturate every later non-zero input.
    """
    scales = {}
    for name, value in amax.items():
        if not math.isfinite(value):
            raise ValueError(f"calibration saw a non-finite input at {name} ({value})")
        # The weights' rule (pow2_scale), computed in float32 as the scale is used
        scales[name] = pow2_scale(torch.tensor(value), E4M3).item() if value else 1.0
    return scales


def convert_linears_to_static_fp8(model: Any, scales: dict[str, float]) -> int:
    """Replace each nn.Linear named in `scales` (relative to the unwrapped model) by a
    Float8StaticLinear with that input scale; returns how many."""
    _compiled_cast()
    base = unwrapped(model)
    for name, scale in scales.items():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        linear = getattr(parent, child)
        if type(linear) is not torch.nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a torch Linear")
        setattr(parent, child, Float8StaticLinear(linear, scale))
    return len(scales)
