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

from vlm_ray.models.chat_templates import CHAT_TEMPLATES
from vlm_ray.models.tokenizer import build_family_tokenizer, train_bpe_tokenizer


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
        chat_template=CHAT_TEMPLATES["qwen2_vl"],
    )
    dtype = torch.bfloat16 if shape.hidden >= 1024 else torch.float32
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def _ids(tok: Any, tokens: list[str]) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def _mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) rotary frequencies over head_dim/2, in Qwen's 16:24:24 proportions."""
    half = head_dim // 2
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def _real_size(shape: Shape) -> bool:
    return shape.hidden >= 1024


def _save(
    model: Any, processor: Any, out: Path, shape: Shape, eos: list[int], pad: int, bos: int | None
) -> dict:
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    dtype = torch.bfloat16 if _real_size(shape) else torch.float32
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def _text_config(shape: Shape, vocab: int, **extra: Any) -> dict[str, Any]:
    """The language-model sizes every family shares."""
    return {
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "tie_word_embeddings": not _real_size(shape),
        **extra,
    }


def _qwen_vl_tokenizer(
    vocab_size: int, family: str
) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """Qwen's tokenizer with the family's chat template, and the ids of its special tokens."""
    tok = _qwen_tokenizer(vocab_size)
    tok.chat_template = CHAT_TEMPLATES[family]
    return tok, _ids(tok, QWEN_SPECIALS)


def _qwen_vl_text_config(
    shape: Shape, tok: Any, ids: dict[str, int], **rope: Any
) -> dict[str, Any]:
    """Qwen2.5-VL / Qwen3-VL language model: the shared sizes, mrope parameters and Qwen's bos/eos/pad."""
    return _text_config(
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
        "intermediate_size": shape.vision_dim * 2 if not _real_size(shape) else real_intermediate,
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
        "tie_word_embeddings": not _real_size(shape),
    }


def _save_qwen_vl(model: Any, processor: Any, out: Path, shape: Shape, ids: dict[str, int]) -> dict:
    return _save(
        model,
        processor,
        out,
        shape,
        [ids["<|im_end|>"]],
        ids["<|endoftext|>"],
        ids["<|endoftext|>"],
    )


def _build_qwen2_5_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
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
            mrope_section=_mrope_section(shape.hidden // shape.heads),
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


def _build_qwen3_vl(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
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
            num_position_embeddings=256 if not _real_size(shape) else 2304,
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


LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


def _build_mllama(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    # <|image|> is the last id: outside the LM head's vocabulary, as in Llama 3.2 Vision (128256)
    tok = build_family_tokenizer(
        LLAMA_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        add_bos=True,
        chat_template=CHAT_TEMPLATES["mllama"],
        vocab_size=vocab_size,
    )
    tok.add_tokens(["<|image|>"], special_tokens=True)
    ids = _ids(tok, [*LLAMA_SPECIALS, "<|image|>"])
    image_id = ids["<|image|>"]
    assert image_id == len(tok) - 1, "the tokenizer must put <|image|> last"
    tile = 56 if not _real_size(shape) else 560
    config = MllamaConfig(
        text_config={
            **_text_config(
                shape, image_id, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}
            ),
            # one cross-attention layer among the self-attention ones (Llama 3.2 11B: every 5th)
            "num_hidden_layers": shape.layers + 1,
            "cross_attention_layers": [shape.layers // 2 + 1]
            if not _real_size(shape)
            else [3, 8, 13, 18, 23, 28, 33, 38],
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        vision_config={
            "hidden_size": shape.vision_dim,
            "num_hidden_layers": shape.vision_depth,
            "num_global_layers": 1,
            "attention_heads": shape.vision_heads,
            "intermediate_size": shape.vision_dim * 4,
            "intermediate_layers_indices": [0],
            # the vision output concatenates the last layer and each intermediate layer
            "vision_output_dim": shape.vision_dim * 2,
            "image_size": tile,
            "patch_size": 14,
            "max_num_tiles": 4,
        },
        image_token_index=image_id,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(
            size={"height": tile, "width": tile}, max_image_tiles=4
        ),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATES["mllama"],
    )
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    return _save(
        model,
        processor,
        out,
        shape,
        eos,
        ids["<|finetune_right_pad_id|>"],
        ids["<|begin_of_text|>"],
    )


GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def _build_gemma3(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = build_family_tokenizer(
        GEMMA_SPECIALS,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        chat_template=CHAT_TEMPLATES["gemma3"],
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        vocab_size=vocab_size,
    )
    ids = _ids(tok, GEMMA_SPECIALS)
    # SigLIP takes one fixed square size (896 in Gemma 3); tiny models use a small one.
    image_size = {True: 896, False: 56}[_real_size(shape)]
    patches_per_side = image_size // 14
    tokens_per_side = (
        16 if _real_size(shape) else 2
    )  # the 4x4 average pool of Gemma 3 -> 256 tokens
    head_dim = shape.hidden // shape.heads
    config = Gemma3Config(
        text_config=_text_config(
            shape,
            len(tok),
            query_pre_attn_scalar=head_dim,
            sliding_window=512,
            # Gemma 3 interleaves local (sliding) and global attention layers, 5:1
            layer_types=[
                "sliding_attention" if (i + 1) % 6 else "full_attention"
                for i in range(shape.layers - 1)
            ]
            + ["full_attention"],
            bos_token_id=ids["<bos>"],
            eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
            pad_token_id=ids["<pad>"],
        ),
        vision_config={
            "hidden_size": shape.vision_dim,
            "intermediate_size": shape.vision_dim * 4,
            "num_hidden_layers": shape.vision_depth,
            "num_attention_heads": shape.vision_heads,
            "image_size": image_size,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=tokens_per_side**2,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    assert patches_per_side % tokens_per_side == 0
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
        ),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATES["gemma3"],
        image_seq_length=tokens_per_side**2,
    )
    return _save(
        model,
        processor,
        out,
        shape,
        [ids["<eos>"], ids["<end_of_turn>"]],
        ids["<pad>"],
        ids["<bos>"],
    )


MISTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]


def _build_pixtral_family(
    out: Path, shape: Shape, vocab_size: int, seed: int, family: str
) -> dict[str, Any]:
    """Llava + Pixtral vision (Pixtral 12B) or Mistral 3 (Mistral Small 3.1, Ministral VL): one tokenizer and processor."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tok = build_family_tokenizer(
        MISTRAL_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        chat_template=CHAT_TEMPLATES[family],
        vocab_size=vocab_size,
    )
    ids = _ids(tok, MISTRAL_SPECIALS)
    # Pixtral 12B: 16 px patches, no merge; Mistral 3: 14 px patches merged 2x2 into one token
    patch, merge = (16, 1) if family == "llava" else (14, 2)
    longest = 1024 if _real_size(shape) else 112
    vision = {
        "model_type": "pixtral",
        "hidden_size": shape.vision_dim,
        "intermediate_size": shape.vision_dim * 4,
        "num_hidden_layers": shape.vision_depth,
        "num_attention_heads": shape.vision_heads,
        "head_dim": shape.vision_dim // shape.vision_heads,
        "image_size": longest,
        "patch_size": patch,
    }
    text = _text_config(
        shape,
        len(tok),
        model_type="mistral",
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=ids["[IMG]"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            tie_word_embeddings=not _real_size(shape),
        )
        model = LlavaForConditionalGeneration(config)
    else:
        config = Mistral3Config(
            vision_config=vision,
            text_config=text,
            image_token_index=ids["[IMG]"],
            spatial_merge_size=merge,
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            tie_word_embeddings=not _real_size(shape),
        )
        model = Mistral3ForConditionalGeneration(config)
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(
            size={"longest_edge": longest}, patch_size=patch * merge
        ),
        tokenizer=tok,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=CHAT_TEMPLATES[family],
    )
    return _save(model, processor, out, shape, [ids["</s>"]], ids["<pad>"], ids["<s>"])


BUILDERS = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "mllama": _build_mllama,
    "gemma3": _build_gemma3,
    "llava": lambda out, shape, vocab, seed: _build_pixtral_family(
        out, shape, vocab, seed, "llava"
    ),
    "mistral3": lambda out, shape, vocab, seed: _build_pixtral_family(
        out, shape, vocab, seed, "mistral3"
    ),
}


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
