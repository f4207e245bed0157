"""Decoding attention for grouped-query models without copying the KV cache per query head.

In a decoding step every sequence has one new query token. transformers' SDPA path (5.17,
`integrations/sdpa_attention.py`) hands a grouped-query layer's keys and values to SDPA
natively only when there is no attention mask; with one — left padding in a batch, or a static
KV cache, whose unused tail is masked — it first repeats them per query head (`repeat_kv`):
Qwen2-VL-2B has 12 query heads on 2 KV heads, so every layer of every step writes and reads the
whole cache six times over.

With one query token the query heads of a group can instead stand in the query-length axis:
``q[b, kv_heads * groups, 1, d]`` viewed as ``[b, kv_heads, groups, d]`` attends over the
un-repeated ``k, v[b, kv_heads, L, d]``, and the ``[b, 1, 1, L]`` mask broadcasts over the
group. Same arithmetic, the cache read once. Prefill (several query tokens) and layers without
grouping go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from vlm_ray.models.submodules import unwrapped

log = logging.getLogger(__name__)

NAME = "vlm_ray_sdpa_gqa_decode"


def gqa_decode_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' SDPA attention, with decoding steps of grouped-query layers done per KV head."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    mask_broadcasts = attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
    )
    if (
        q_len != 1
        or groups == 1
        or heads != kv_heads * groups
        or not mask_broadcasts
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions")
        or key.shape[-1] != value.shape[-1]
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # Query head h belongs to KV head h // groups (repeat_kv's order), so a plain reshape groups them.
    grouped = query.reshape(batch, kv_heads, groups, dim)
    out = sdpa(grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    # [b, kv_heads, groups, d] -> transformers' layout for attention outputs, [b, q_len=1, heads, d]
    return out.reshape(batch, 1, heads, dim), None


def enable_gqa_decode_attention(model: Any) -> bool:
    """Route the language model's attention through gqa_decode_sdpa_attention, if it is on SDPA.

    Returns whether it was enabled. For inference: the setting is not meant to be saved with the
    model (another process would not know the name).
    """
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = unwrapped(model)
    config = getattr(base, "config", None)
    if not isinstance(base, PreTrainedModel) or config is None:
        return False
    text = getattr(config, "text_config", None)
    if text is None:
        return False  # not a vision-language model with a language sub-config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not heads or heads == kv_heads:
        return False  # no grouped-query attention: nothing to gain
    if text._attn_implementation not in ("sdpa", NAME):
        return False  # eager, flash or flex was asked for: leave it
    AttentionInterface.register(NAME, gqa_decode_sdpa_attention)
    # Masks are built exactly as for "sdpa" (which may also drop them when nothing is masked).
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    base.set_attn_implementation({"text_config": NAME})
    log.info(
        "language model attention: decoding steps read the KV cache once per KV head (%d query heads on %d)",
        heads,
        kv_heads,
    )
    return True
