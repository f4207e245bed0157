"""Linear layers in float8 for inference (spec infer.fp8), through torchao.

Why: with the vision blocks compiled and the static KV cache, a 2B Qwen2-VL's batched
inference is bound by its prefill, and the prefill by bf16 GEMMs that already run at ~75% of an
H100's dense bf16 peak (docs/benchmarks.md, inference run 3). Hopper-class GPUs (compute
capability 8.9 and newer) run float8 GEMMs at twice that peak, so this is the lever left there.

How: torchao's `Float8DynamicActivationFloat8WeightConfig` with per-row scales: each weight is
quantized once, at load, with one scale per output channel; each activation per token at run time
(fused into its neighbours where the block is compiled). The numerics change: outputs are close to
bf16's, not equal, so it is opt-in and its fidelity is measured beside its speed.

Scopes: "vision" quantizes the vision tower's blocks (where most of the FLOPs of an image are);
"all" also every other linear layer except the output head (the vocabulary projection stays in
bf16, as serving engines keep it: its errors would go straight into the token choice).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from vlm_ray.models.compiled_vision import vision_blocks
from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)

Fp8Scope = Literal["vision", "all"]
Fp8Scaling = Literal["row", "tensor"]
# float8 GEMMs (torch._scaled_mm) need both matrix dimensions divisible by 16.
GEMM_ALIGN = 16


def fp8_target_linears(model: Any, scope: Fp8Scope) -> list[str]:
    """Qualified names (relative to the unwrapped model) of the nn.Linear layers `scope` quantizes.

    Layers whose in/out features are not multiples of 16 are left in bf16 (float8 GEMMs need
    them aligned), as is the output head.
    """
    import torch

    base = unwrapped(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    in_vision = {id(m) for block in vision_blocks(base) for m in block.modules()}
    names = []
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if scope == "vision" and id(module) not in in_vision:
            continue
        if module.in_features % GEMM_ALIGN or module.out_features % GEMM_ALIGN:
            continue
        names.append(name)
    return names


def require_float8_gpu(setting: str, turn_off: str) -> None:
    """Raise a ValueError naming `setting` unless this process has a CUDA GPU that runs float8
    GEMMs (compute capability 8.9 or newer); the message ends with `turn_off`, the way out."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            f"{setting} needs a CUDA GPU of compute capability 8.9 or newer (H100, H200, L4, "
            f"L40S); this process has no CUDA device. {turn_off}."
        )
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise ValueError(
            f"{setting} needs compute capability 8.9 or newer; {torch.cuda.get_device_name()} "
            f"has {capability[0]}.{capability[1]}. {turn_off} on this GPU."
        )


def check_fp8_device(scope: str) -> None:
    """Raise a ValueError naming infer.fp8 unless this process has a CUDA GPU that runs float8 GEMMs."""
    require_float8_gpu(f"infer.fp8: {scope!r}", "Set infer.fp8: off")


def quantize_linears_to_fp8(model: Any, scope: Fp8Scope, scaling: Fp8Scaling = "row") -> int:
    """Quantize the layers fp8_target_linears names to float8 in place; returns how many.

    `scaling` (infer.fp8_scaling): "row", one scale per token of an activation and per output
    channel of a weight; "tensor", one scale per tensor for both.

    Call after any adapter is merged (a LoRA layer is not an nn.Linear to torchao) and before
    the vision blocks are compiled (so that compilation sees the float8 weights).
    """
    check_fp8_device(scope)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    base = unwrapped(model)
    names = set(fp8_target_linears(base, scope))
    if not names:
        log.warning("infer.fp8=%s: no linear layer of this model qualifies; left in bf16", scope)
        return 0
    quantize_(
        base,
        # set_inductor_config (torchao's default: on) turns on Inductor's coordinate-descent
        # tuning in all directions for the whole process: measured on an H200 it spent 170 of
        # the 200 s first generate at batch 512 tuning kernels (inference run 6).
        Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if scaling == "row" else PerTensor(), set_inductor_config=False
        ),
        filter_fn=lambda module, fqn: fqn in names,
    )
    log.info(
        "infer.fp8=%s: %d linear layers quantized to float8 (per-%s scales)",
        scope,
        len(names),
        scaling,
    )
    return len(names)
