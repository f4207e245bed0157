"""Qwen-VL patch embeddings as the matrix multiply they are, instead of a degenerate Conv3d.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL embed patches with ``nn.Conv3d(kernel_size=k, stride=k)``
over inputs already cut to one patch each: every output sees exactly one patch, so the
convolution is ``x.reshape(n, -1) @ W.reshape(d, -1).T``. cuDNN has no good algorithm for that
shape on some GPU/dtype/version combinations (transformers issue #45750; vLLM, SGLang and axolotl
run it as a GEMM for this reason). transformers 5.17's own switch for it
(``fusion_config={"patch_embeddings": True}``) did not fit: tried on a checkpoint saved by
transformers 5.17, it reported the renamed weight missing and initialised it at random, and it
patches the class, so a model loaded afterwards without the switch changed too. This module
changes only the forward of the loaded model's modules and keeps the weights where they are.
Used for inference (vlm_ray.infer.loading).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _is_patchify_conv(conv: Any) -> bool:
    import torch.nn as nn

    return (
        isinstance(conv, nn.Conv3d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and not any(conv.padding)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
    )


def run_patch_embeddings_as_matmul(model: Any) -> int:
    """Make every `*.patch_embed` module with a patchify Conv3d `proj` run as F.linear; returns how many."""
    import torch.nn.functional as F

    changed = 0
    for name, module in model.named_modules():
        conv = getattr(module, "proj", None)
        if not name.endswith("patch_embed") or not _is_patchify_conv(conv):
            continue

        def forward(hidden_states: Any, conv: Any = conv) -> Any:
            weight = conv.weight  # [embed_dim, channels, t, h, w], flattened in the input's order
            flat = hidden_states.to(weight.dtype).reshape(-1, weight[0].numel())
            return F.linear(flat, weight.reshape(weight.shape[0], -1), conv.bias)

        module.forward = forward
        changed += 1
    if changed:
        log.info("patch embeddings: %d Conv3d run as one matrix multiply each", changed)
    return changed
