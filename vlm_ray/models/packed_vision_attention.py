"""One batched SDPA call over a vision tower's packed images, instead of one call per image.

Qwen2-VL and Qwen2.5-VL pack every image of a batch into one token sequence. Unless a
flash-attention implementation is configured, transformers (5.17, `Qwen2VLVisionAttention`)
splits that sequence and calls SDPA once per image, in every layer: at 256 images and 32 layers,
8,192 small attention calls per forward, each with its own launch and Python overhead on the
critical path of inference, and in training three device synchronisations per layer call
(the `.tolist()` of each split). When the images of a batch have the same size — which is what
`vlm_ray.infer.generation` arranges (batches by pixel count, sizes snapped by prepare) — the packed
sequence is just ``[images, tokens]``, and one SDPA call with the images as its batch dimension
computes exactly the same attention.

transformers routes a vision tower to its packed (``cu_seqlens``) path when the configured
attention name contains "flash" (`utils.generic.is_flash_attention_requested`); hence the name
below. The function itself uses only torch's SDPA. Mixed sizes fall back to one call per image,
as transformers does.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

from vlm_ray.models.compiled_vision import vision_blocks
from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)

NAME = "vlm_ray_flash_packed_sdpa"
# Set on a vision attention module: the SDPA backends its calls try, in this order.
SDPA_BACKENDS_ATTR = "_vlm_ray_sdpa_backends"
# Vision towers whose attention takes the packed cu_seqlens path.
PACKED_VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def packed_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
    cu_seq_lens_q: Any = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention over packed segments ([1, heads, total, dim], boundaries in cu_seq_lens_q)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    with _backends_of(module):
        _, heads, total, dim = query.shape
        segments = int(cu_seq_lens_q.shape[0]) - 1
        if max_length_q is not None and segments * int(max_length_q) == total:
            # Every segment is max_length_q long (they sum to total and none is longer): a batch.
            length = int(max_length_q)
            q, k, v = (
                t[0].view(heads, segments, length, dim).transpose(0, 1) for t in (query, key, value)
            )
            out = sdpa(q, k, v, dropout_p=dropout, scale=scaling, is_causal=is_causal)
            return out.transpose(1, 2).reshape(1, total, heads, dim), None
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
        outs = [
            sdpa(q, k, v, dropout_p=dropout, scale=scaling, is_causal=is_causal).transpose(1, 2)
            for q, k, v in zip(
                *(torch.split(t, lengths, dim=2) for t in (query, key, value)), strict=True
            )
        ]
        return torch.cat(outs, dim=1), None


def _backends_of(module: Any) -> Any:
    """The SDPA backend context prefer_cudnn_vision_attention set on `module` (none: torch's choice)."""
    backends = getattr(module, SDPA_BACKENDS_ATTR, None)
    if backends is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    # Scoped to this call: the language model's attention keeps the process-wide choice.
    return sdpa_kernel(list(backends), set_priority=True)


def enable_packed_vision_attention(model: Any) -> bool:
    """Use packed_sdpa_attention in the vision tower of a Qwen2-VL-like model left on SDPA.

    Returns whether it was enabled. Used for inference and training; the setting is not saved
    with the model (config.json leaves the attention implementation out).
    """
    from transformers import AttentionInterface, PreTrainedModel

    base = unwrapped(model)
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", None)
    if not isinstance(base, PreTrainedModel) or vision is None:
        return False
    if config.model_type not in PACKED_VISION_MODEL_TYPES:
        return False
    current = vision._attn_implementation
    if current not in (None, "sdpa", NAME):
        return False  # eager or a real flash attention was asked for: leave it
    AttentionInterface.register(NAME, packed_sdpa_attention)
    base.set_attn_implementation({"vision_config": NAME})
    log.info("vision tower attention: one batched SDPA call per layer for same-size images")
    return True


def prefer_cudnn_vision_attention(model: Any) -> int:
    """Make the packed vision attention of `model` try cuDNN's SDPA kernel first (infer.vision_attention).

    Returns how many attention modules now do (0 when the model's vision tower does not use
    packed_sdpa_attention: enable_packed_vision_attention first). cuDNN's kernel, where it cannot
    take a call, falls back to flash, memory-efficient, then math attention, as torch would.
    """
    from torch.nn.attention import SDPBackend

    base = unwrapped(model)
    vision = getattr(getattr(base, "config", None), "vision_config", None)
    if getattr(vision, "_attn_implementation", None) != NAME:
        return 0
    order = (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    )
    modules = [block.attn for block in vision_blocks(base) if hasattr(block, "attn")]
    for attn in modules:
        setattr(attn, SDPA_BACKENDS_ATTR, order)
    if modules:
        log.info("vision tower attention: cuDNN's SDPA kernel first in %d layers", len(modules))
    return len(modules)
