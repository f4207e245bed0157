"""LoRA's frozen base layers as float8 GEMMs while training (spec train.fp8).

Why: from batch 32 up, the 7B LoRA step is bound by the GPU's arithmetic, at ~58% of an H200's
dense bf16 peak (docs/benchmarks.md, run 16), and most of that arithmetic is the frozen base
weights' GEMMs: the forward, its recomputation under checkpointing, and the gradient with respect
to the input. Hopper GPUs run float8 GEMMs at twice the bf16 peak. The LoRA adapters, attention,
norms and the output head stay in bf16.

How: each LoRA layer's base nn.Linear is replaced by a Float8FrozenLinear holding its weight in
float8 (e4m3, one scale for the tensor, quantized once: the weight never changes). Per call, the
input is quantized to e4m3 and multiplied with torch._scaled_mm; in the backward the output
gradient (e5m2, for its range) is multiplied with the weight's transpose. No weight gradient is
computed: the weight is frozen. Activations and gradients get one scale per token by default
(train.fp8_scaling "row"): with one scale per tensor, one outlier token pushes every other
value toward float8's subnormals (a token 30,000 times the others tripled the rest's error in
the CPU test; per token it did not change). "tensor" is the cheaper kernel (cuBLAS rather than
CUTLASS's rowwise one) for those who measure it to be enough.

Why not torchao's float8 training (convert_to_float8_training): its Float8Linear re-quantizes the
weight on every call and computes the weight gradient unconditionally (torchao 0.18,
float8/float8_linear.py, backward), a third of a frozen layer's GEMM work spent on a gradient
nobody reads. Scales are powers of two (as with torchao's round_scales_to_power_of_2), so
quantizing is exact for values float8 can hold.

The weight is stored as uint8 bits (viewed as float8 when used), so a model-wide
`.to(torch.bfloat16)` cannot silently cast it. `keep_bf16_on_host` keeps the original weight
in host memory, to restore before a merged save (restore_bf16_base_layers): merging an adapter
into float8 weights would lose precision.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlm_ray.models.fp8_linear import GEMM_ALIGN, Fp8Scaling, require_float8_gpu

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def pow2_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest power of two s with amax / s <= `dtype`'s largest value, at least 2**-126
    (float32's smallest normal number; a row of zeros gets that), in float32."""
    ratio = torch.clamp(amax.float() / torch.finfo(dtype).max, min=2.0**-126)
    return torch.exp2(torch.ceil(torch.log2(ratio)))


def saturating_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t / scale in `dtype`: division by a power of two is exact, and the clamp makes an
    out-of-range value saturate (CUDA's float8 cast would make it NaN)."""
    fp8_max = torch.finfo(dtype).max
    return (t.float() / scale).clamp(-fp8_max, fp8_max).to(dtype)


def quantize_pow2(
    t: torch.Tensor, dtype: torch.dtype, rowwise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in `dtype`, scale): power-of-two scales, one for the whole 2-D tensor, or with
    `rowwise` one per row (shape (rows, 1))."""
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = pow2_scale(amax, dtype)
    return saturating_cast(t, scale, dtype), scale


_quantize_compiled: Any = None


def _compiled_quantize() -> Any:
    """quantize_pow2 under torch.compile: on CUDA its abs/amax/divide/cast run as one or two fused
    kernels instead of six. Made when layers are converted (outside any traced region: a wrapper
    first made inside code that Unsloth's own compiled blocks trace would be traced as well), and
    not at import, which would import torch._dynamo (~2 s) for every user of this module."""
    global _quantize_compiled
    if _quantize_compiled is None:
        _quantize_compiled = torch.compile(quantize_pow2, dynamic=True)
    return _quantize_compiled


def quantize_activation(
    t: torch.Tensor, dtype: torch.dtype, rowwise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_pow2, compiled on CUDA (eager elsewhere: CPU compilation needs a C++ toolchain)."""
    return (_compiled_quantize() if t.is_cuda else quantize_pow2)(t.contiguous(), dtype, rowwise)


def _scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """a @ b in float8; with a per-row a_scale, the weight's one scale is spread over b's
    columns, as the rowwise kernel wants (scales (M, 1) and (1, N))."""
    mm_dtype = out_dtype
    if a_scale.dim() == 2:
        b_scale = b_scale.reshape(1, 1).expand(1, b.shape[1]).contiguous()
        if a.is_cuda:
            mm_dtype = torch.bfloat16  # CUDA's rowwise kernel writes bf16 only
    out = torch._scaled_mm(
        a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=mm_dtype, use_fast_accum=fast_accum
    )
    return out if mm_dtype == out_dtype else out.to(out_dtype)


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ W.T with W frozen in float8: float8 forward and input gradient, no weight gradient.

    x is 2-D: the caller reshapes outside, so that the output is no view made inside a custom
    Function (autograd forbids changing those in place; train.lora_add_without_copy does)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rowwise: bool
    ) -> Any:
        ctx.save_for_backward(weight, scale)
        ctx.rowwise = rowwise
        xq, x_scale = quantize_activation(x, E4M3, rowwise)
        # weight.t(): (in, out), column-major, what _scaled_mm wants on the right; fast
        # accumulation in the forward only, as torchao's float8 training does.
        return _scaled_mm(xq, x_scale, weight.t(), scale, x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, scale = ctx.saved_tensors
        gq, g_scale = quantize_activation(grad_out, E5M2, ctx.rowwise)
        # (out, in) column-major for the right operand: a transposed copy, one byte per weight,
        # made here rather than kept (it would double the weights' memory).
        weight_cm = weight.t().contiguous().t()
        grad_x = _scaled_mm(gq, g_scale, weight_cm, scale, grad_out.dtype, fast_accum=False)
        return grad_x, None, None, None


class Float8Weight(torch.nn.Module):
    """A frozen nn.Linear's weight and bias, the weight held in e4m3 with one power-of-two scale.

    The weight is stored as uint8 bits (a float8 view when read): Module.to(dtype) casts floating
    tensors, not these. Subclasses define the GEMM.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            q, scale = quantize_pow2(linear.weight.detach(), E4M3)
        self.register_buffer("weight_bits", q.view(torch.uint8))
        self.register_buffer("weight_scale", scale.reshape(()))
        self.bias = linear.bias  # kept as it was (trainable under lora.bias "all")

    @property
    def weight(self) -> torch.Tensor:
        """The float8 weight (readers such as PEFT's and Unsloth's casts see a 1-byte dtype)."""
        return self.weight_bits.view(E4M3)


class Float8FrozenLinear(Float8Weight):
    """A frozen nn.Linear whose GEMMs run in float8 (see the module docstring).

    The weight has one scale; activations and output gradients get one per row (token) with
    scaling "row", or one per tensor with "tensor".
    """

    def __init__(
        self,
        linear: torch.nn.Linear,
        scaling: Fp8Scaling = "row",
        keep_bf16_on_host: bool = False,
    ) -> None:
        super().__init__(linear)
        self.rowwise = scaling == "row"
        # Not a buffer: it stays in host memory through .to("cuda"), and out of state_dict.
        self.host_weight = (
            linear.weight.detach().to("cpu", copy=True) if keep_bf16_on_host else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = _Float8FrozenMatmul.apply(rows, self.weight, self.weight_scale.float(), self.rowwise)
        if x.dim() != 2:
            # reshaped out here, not inside the Function (autograd forbids changing a view made
            # there in place); 2-D stays no view at all, which LoRA's in-place add needs
            # (lora_add_without_copy.can_add_in_place)
            out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        scaling = "row" if self.rowwise else "tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 {scaling}"


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    ]


def _why_not(base: Any, min_features: int) -> str | None:
    if type(base) is not torch.nn.Linear:
        return f"its base layer is a {type(base).__name__}, not a torch Linear"
    if base.weight.requires_grad:
        return "its base weight is trained"
    if base.in_features % GEMM_ALIGN or base.out_features % GEMM_ALIGN:
        return f"{base.in_features}x{base.out_features} is not a multiple of {GEMM_ALIGN}"
    width = effective_width(base.in_features, base.out_features)
    if width < min_features:
        return (
            f"{base.in_features}x{base.out_features} (effective width {width:.0f}) is narrower "
            f"than train.fp8_min_features={min_features} (quantizing costs more than float8 saves)"
        )
    return None


def effective_width(in_features: int, out_features: int) -> float:
    """The harmonic mean of a layer's widths, 2·in·out / (in + out): what decides float8's gain.

    Per token, float8 halves a GEMM's in·out multiply-adds but adds quantizing the input (in
    values) and, in the backward, the output gradient (out values), so the gain over the cost
    grows as in·out / (in + out). For a square layer it is the width itself.
    """
    return 2 * in_features * out_features / (in_features + out_features)


def convert_lora_base_layers_to_fp8(
    model: Any,
    scaling: Fp8Scaling = "row",
    keep_bf16_on_host: bool = False,
    min_features: int = GEMM_ALIGN,
) -> int:
    """Replace every eligible LoRA layer's frozen base nn.Linear by a Float8FrozenLinear; how many.

    Eligible: a plain torch Linear (not bitsandbytes'), frozen, with both dimensions multiples
    of 16 and an effective_width of at least min_features. The others stay as they are,
    counted in one log line per reason.
    """
    _compiled_quantize()
    converted, skipped = 0, {}
    for name, layer in _lora_layers(model):
        base = layer.base_layer
        why = _why_not(base, min_features)
        if why is not None:
            skipped.setdefault(why, []).append(name)
            continue
        layer.base_layer = Float8FrozenLinear(base, scaling, keep_bf16_on_host)
        converted += 1
    for why, names in skipped.items():
        log.warning(
            "train.fp8: %d LoRA layers keep their base precision: %s (e.g. %s)",
            len(names),
            why,
            names[0],
        )
    log.info(
        "train.fp8: %d LoRA base layers run as float8 GEMMs (per-%s activation scales)",
        converted,
        scaling,
    )
    return converted


def fp8_layer_count(model: Any) -> int:
    """How many Float8FrozenLinear layers the model has (the run summary's fp8_base_layers)."""
    return sum(isinstance(m, Float8FrozenLinear) for m in model.modules())


def fp8_weight_count(model: Any) -> int:
    """How many weights the model's Float8FrozenLinear layers hold (buffers, not parameters)."""
    return sum(m.weight_bits.numel() for m in model.modules() if isinstance(m, Float8FrozenLinear))


def restore_bf16_base_layers(model: Any) -> int:
    """Put the original base nn.Linear back wherever a host copy was kept; how many.

    Raises ValueError when a converted layer has no host copy (keep_bf16_on_host was off):
    merging into float8 weights would silently lose precision.
    """
    restored = 0
    for name, layer in _lora_layers(model):
        base = layer.base_layer
        if not isinstance(base, Float8FrozenLinear):
            continue
        if base.host_weight is None:
            raise ValueError(
                f"train.fp8: {name} kept no bf16 copy of its base weight, so the adapter cannot "
                "be merged into it at full precision"
            )
        linear = torch.nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device="meta",
        )
        linear.weight = torch.nn.Parameter(
            base.host_weight.to(base.weight_bits.device), requires_grad=False
        )
        linear.bias = base.bias
        layer.base_layer = linear
        restored += 1
    return restored


def check_fp8_training_device() -> None:
    """Raise a ValueError naming train.fp8 unless a CUDA GPU of compute capability >= 8.9 is here."""
    require_float8_gpu("train.fp8", "Set train.fp8: false")
