"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL (see vlm_ray.models.tiny)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from vlm_ray.models.chat_templates import CHAT_TEMPLATES
from vlm_ray.models.tiny_common import (
    Shape,
    is_real_size,
    mrope_section,
    save_model,
    text_config,
    token_ids,
)
from vlm_ray.models.tokenizer import train_bpe_tokenizer

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    raw = train_bpe_tokenizer(QWEN_SPECIALS, vocab_size=vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIALS[1:],
        model_max_length=32768,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATES["qwen2_vl"]
    return tok


def build_qwen2_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _qwen_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = shape.hidden // shape.heads
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) as Qwen does (16, 24, 24 of 64)
    half = head_dim // 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": mrope,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": shape.hidden < 1024,
        },
        vision_config={
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_dim,
            "num_heads": shape.vision_heads,
            "hidden_size": shape.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape.hidden < 1024,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    # Small images are the point of a tiny model: let the processor keep them small.
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=1024 * 1024)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATES["qwen2_vl"],
    )
    dtype = torch.bfloat16 if shape.hidden >= 1024 else torch.float32
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def _qwen_vl_tokenizer(
    vocab_size: int, family: str
) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """Qwen's tokenizer with the family's chat template, and the ids of its special tokens."""
    tok = _qwen_tokenizer(vocab_size)
    tok.chat_template = CHAT_TEMPLATES[family]
    return tok, token_ids(tok, QWEN_SPECIALS)


def _qwen_vl_text_config(
    shape: Shape, tok: Any, ids: dict[str, int], **rope: Any
) -> dict[str, Any]:
    """Qwen2.5-VL / Qwen3-VL language model: the shared sizes, mrope parameters and Qwen's bos/eos/pad."""
    return text_config(
        shape,
        len(tok),
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", **rope},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _qwen_vl_vision_config(
    shape: Shape, patch_size: int, real_intermediate: int, **extra: Any
) -> dict[str, Any]:
    """Qwen2.5-VL / Qwen3-VL vision tower sizes (the real model's MLP width at real size)."""
    return {
        "depth": shape.vision_depth,
        "hidden_size": shape.vision_dim,
        "intermediate_size": shape.vision_dim * 2 if not is_real_size(shape) else real_intermediate,
        "num_heads": shape.vision_heads,
        "out_hidden_size": shape.hidden,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **extra,
    }


def _qwen_vl_token_ids(shape: Shape, ids: dict[str, int]) -> dict[str, Any]:
    """The image/video placeholder and vision-span ids a Qwen2.5-VL / Qwen3-VL config names."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": not is_real_size(shape),
    }


def _save_qwen_vl(model: Any, processor: Any, out: Path, shape: Shape, ids: dict[str, int]) -> dict:
    return save_model(
        model,
        processor,
        out,
        shape,
        [ids["<|im_end|>"]],
        ids["<|endoftext|>"],
        ids["<|endoftext|>"],
    )


def build_qwen2_5_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok, ids = _qwen_vl_tokenizer(vocab_size, "qwen2_5_vl")
    config = Qwen2_5_VLConfig(
        text_config=_qwen_vl_text_config(
            shape,
            tok,
            ids,
            rope_theta=1_000_000.0,
            mrope_section=mrope_section(shape.hidden // shape.heads),
        ),
        vision_config=_qwen_vl_vision_config(
            shape,
            patch_size=14,
            real_intermediate=3420,
            window_size=112,
            # Qwen2.5-VL: window attention everywhere but a few full-attention blocks (the last, here)
            fullatt_block_indexes=[shape.vision_depth - 1],
        ),
        **_qwen_vl_token_ids(shape, ids),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=1024 * 1024),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATES["qwen2_5_vl"],
    )
    return _save_qwen_vl(model, processor, out, shape, ids)


def build_qwen3_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok, ids = _qwen_vl_tokenizer(vocab_size, "qwen3_vl")
    half = shape.hidden // shape.heads // 2
    t = 3 * half // 8  # Qwen3-VL's interleaved mrope: 24:20:20 of 64
    config = Qwen3VLConfig(
        text_config=_qwen_vl_text_config(
            shape,
            tok,
            ids,
            rope_theta=5_000_000.0,
            mrope_section=[t, (half - t) // 2, half - t - (half - t) // 2],
            mrope_interleaved=True,
        ),
        vision_config=_qwen_vl_vision_config(
            shape,
            patch_size=16,
            real_intermediate=4304,
            num_position_embeddings=256 if not is_real_size(shape) else 2304,
            # DeepStack: features of these vision blocks are added into the first LM layers
            deepstack_visual_indexes=[shape.vision_depth - 1],
        ),
        **_qwen_vl_token_ids(shape, ids),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16,
            merge_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            min_pixels=32 * 32 * 4,
            max_pixels=1024 * 1024,
        ),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATES["qwen3_vl"],
    )
    return _save_qwen_vl(model, processor, out, shape, ids)
