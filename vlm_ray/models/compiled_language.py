"""The language model's MLPs and RMSNorms compiled with torch.compile, for inference
(spec infer.compile_language).

In a decoder layer the attention holds per-layer state (its layer index into the KV cache), so
compiling whole layers would compile once per layer. Its MLP and norms hold none, and they are
where the prefill's elementwise work sits: SiLU(gate)·up over the 6x-wide activation, and each
RMSNorm's float32 upcast, square, mean, rsqrt and scale as separate passes over every token.
Compiled, each becomes one or two fused kernels, and with infer.fp8: all the per-token float8
scaling of their linear layers' inputs fuses with them too (eager, it is separate kernels per
layer, which made `all` slower than `vision` at the 2B shape). Every MLP shares one code object,
as does every norm, so the compilation is paid once per input shape (prefill and decoding
lengths, dynamic after the second). With cache_implementation: static transformers compiles the
whole decoding step anyway and traces through these; with the dynamic cache each compiled call
adds a guard check per layer to decoding steps that are already CPU-bound.
"""

from __future__ import annotations

import logging
from typing import Any

from vlm_ray.models.submodules import inner_module

log = logging.getLogger(__name__)

_COMPILED_KINDS = ("MLP", "RMSNorm")


def language_elementwise_modules(model: Any) -> list[Any]:
    """The language model's MLP and RMSNorm modules (by class name), outermost first."""
    decoder = inner_module(model, "language_model")
    if decoder is None:
        return []
    picked: list[Any] = []
    inside: set[int] = set()
    for module in decoder.modules():  # parents before their children
        if id(module) not in inside and type(module).__name__.endswith(_COMPILED_KINDS):
            picked.append(module)
            inside.update(id(m) for m in module.modules())
    return picked


def compile_language_modules(model: Any) -> int:
    """torch.compile the modules language_elementwise_modules returns, in place; returns how many."""
    modules = language_elementwise_modules(model)
    for module in modules:
        module.compile()
    if modules:
        log.info(
            "language model: %d MLP / RMSNorm modules compiled with torch.compile", len(modules)
        )
    return len(modules)
