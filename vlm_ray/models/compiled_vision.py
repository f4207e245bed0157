"""The vision tower's blocks compiled with torch.compile (spec infer.compile_vision, train.compile_vision).

A Qwen2-VL vision block is two matmul-heavy halves joined by memory-bound elementwise work over
every patch of the batch: LayerNorms, the rotary embedding (done in float32), QuickGELU over
the 4x-wide MLP activation, residual adds. At 256 images of 448 px that is 262,144 patches, and
each unfused elementwise op is a pass over hundreds of MB. Inductor fuses them into the matmuls'
neighbours. All blocks share one code object, so the compilation is paid once per process and
input shape (a new patch count may compile once more, with dynamic shapes).

In training the same holds, and a second reason comes first: at small batches the step is bound
by host time, and a block of Python-dispatched ops (LoRA layers, rotary, attention) costs more
on the host than on the GPU. Compiled, the block's forward, its recomputation under activation
checkpointing (transformers calls the compiled module inside the checkpoint) and its backward
are one graph each.
"""

from __future__ import annotations

import logging
from typing import Any

from vlm_ray.models.submodules import inner_module

log = logging.getLogger(__name__)


def vision_blocks(model: Any) -> list[Any]:
    """The repeated transformer blocks of a Qwen-VL-style vision tower (`visual.blocks`), or []."""
    blocks = getattr(inner_module(model, "visual"), "blocks", None)
    return list(blocks) if blocks is not None else []


def compile_vision_blocks(model: Any) -> int:
    """torch.compile every vision block in place (nn.Module.compile); returns how many."""
    blocks = vision_blocks(model)
    for block in blocks:
        block.compile()
    if blocks:
        log.info("vision tower: %d blocks compiled with torch.compile", len(blocks))
    return len(blocks)
