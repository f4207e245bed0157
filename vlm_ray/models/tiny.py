"""Build random-weight VLMs of the supported architectures locally, in the normal HF layout.

No hub access is needed: the config is written from the family's real
architecture at a chosen size, the tokenizer is trained locally, the image
processor is the family's real one, and the chat template is the family's.
`from_pretrained(<folder>)` on the result is exactly the production loading path.

    python -m vlm_ray.models.tiny --family qwen2_vl --out models/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from vlm_ray.models.tokenizer import train_bpe_tokenizer


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
}

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template Qwen2-VL ships (tokenizer_config.json of Qwen/Qwen2-VL-*-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def _build_qwen2_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
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
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    dtype = torch.bfloat16 if shape.hidden >= 1024 else torch.float32
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


BUILDERS = {"qwen2_vl": _build_qwen2_vl}


def build_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    size: str = "tiny",
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Build a random-weight model of `family` at `size` into out_dir (reused if already built)."""
    out = Path(out_dir)
    marker = out / "vlm_ray_tiny.json"
    want = {"family": family, "size": size, "vocab_size": vocab_size, "seed": seed}
    if (
        marker.exists()
        and {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want
    ):
        return out
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(BUILDERS)}")
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    info = BUILDERS[family](out, SHAPES[size], vocab_size, seed)
    marker.write_text(json.dumps({**want, **info}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: build a tiny model folder."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--family", default="qwen2_vl", choices=sorted(BUILDERS))
    p.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--out", required=True, help="Folder to write the model into.")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = build_tiny_model(a.out, a.family, a.size, a.vocab_size, a.seed)
    print(f"built {a.family} ({a.size}) at {path}")


if __name__ == "__main__":
    main()
