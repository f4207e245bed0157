"""What every tiny-model builder shares: the sizes (Shape, SHAPES) and config/save helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """Sizes of the language model and vision tower."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_dim: int
    vision_depth: int
    vision_heads: int


SHAPES: dict[str, Shape] = {
    # tests: seconds to build and to train a few steps on 2 CPU cores
    "tiny": Shape(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vision_dim=32,
        vision_depth=1,
        vision_heads=2,
    ),
    # the demo: small enough to train on 2 cores in minutes, big enough to learn digits
    "small": Shape(
        hidden=128,
        layers=4,
        heads=4,
        kv_heads=2,
        intermediate=256,
        vision_dim=64,
        vision_depth=2,
        vision_heads=4,
    ),
    # real shapes, for GPU benchmarks (random weights)
    "2b": Shape(
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        intermediate=8960,
        vision_dim=1280,
        vision_depth=32,
        vision_heads=16,
    ),
    "7b": Shape(
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        intermediate=18944,
        vision_dim=1280,
        vision_depth=32,
        vision_heads=16,
    ),
    # Llama-3.2-11B-Vision (family mllama): 32 self-attention layers (the builder adds its 8
    # cross-attention layers) and a 32-layer vision encoder (plus its 8 global layers)
    "11b": Shape(
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vision_dim=1280,
        vision_depth=32,
        vision_heads=16,
    ),
}


def token_ids(tok: Any, tokens: list[str]) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary frequencies over head_dim/2, in Qwen's 16:24:24 proportions."""
    half = head_dim // 2
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def is_real_size(shape: Shape) -> bool:
    return shape.hidden >= 1024


def save_model(
    model: Any, processor: Any, out: Path, shape: Shape, eos: list[int], pad: int, bos: int | None
) -> dict:
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    dtype = torch.bfloat16 if is_real_size(shape) else torch.float32
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def text_config(shape: Shape, vocab: int, **extra: Any) -> dict[str, Any]:
    """The language-model sizes every family shares."""
    return {
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "tie_word_embeddings": not is_real_size(shape),
        **extra,
    }
