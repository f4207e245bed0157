"""Tiny random-weight Llama 3.2 Vision, Gemma 3, Pixtral and Mistral 3 (see vlm_ray.models.tiny)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm_ray.models.chat_templates import CHAT_TEMPLATES
from vlm_ray.models.tiny_common import Shape, is_real_size, save_model, text_config, token_ids
from vlm_ray.models.tokenizer import build_family_tokenizer

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


def mllama_config(shape: Shape, vocab: int, ids: dict[str, int]) -> Any:
    """An MllamaConfig of `shape`: at a real size, Llama-3.2-11B-Vision's layout.

    Small shapes get one cross-attention layer, one global vision layer and one intermediate
    vision output; real shapes get Llama 3.2 11B's: a cross-attention layer after every 4
    self-attention layers (8 of 40), 8 global vision layers and 5 intermediate outputs.
    """
    from transformers import MllamaConfig

    real = is_real_size(shape)
    cross = [3, 8, 13, 18, 23, 28, 33, 38] if real else [shape.layers // 2 + 1]
    intermediate_outputs = [3, 7, 15, 23, 30] if real else [0]
    return MllamaConfig(
        text_config={
            **text_config(
                shape, vocab, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}
            ),
            "num_hidden_layers": shape.layers + len(cross),
            "cross_attention_layers": cross,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        vision_config={
            "hidden_size": shape.vision_dim,
            "num_hidden_layers": shape.vision_depth,
            "num_global_layers": 8 if real else 1,
            "attention_heads": shape.vision_heads,
            "intermediate_size": shape.vision_dim * 4,
            "intermediate_layers_indices": intermediate_outputs,
            # the vision output concatenates the last layer and each intermediate layer
            "vision_output_dim": shape.vision_dim * (1 + len(intermediate_outputs)),
            "image_size": 560 if real else 56,
            "patch_size": 14,
            "max_num_tiles": 4,
        },
        image_token_index=ids["<|image|>"],
    )


def build_mllama(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

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
    ids = token_ids(tok, [*LLAMA_SPECIALS, "<|image|>"])
    image_id = ids["<|image|>"]
    assert image_id == len(tok) - 1, "the tokenizer must put <|image|> last"
    config = mllama_config(shape, image_id, ids)
    tile = config.vision_config.image_size
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
    return save_model(
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


def build_gemma3(out: Path, shape: Shape, vocab_size: int, seed: int) -> dict[str, Any]:
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
    ids = token_ids(tok, GEMMA_SPECIALS)
    # SigLIP takes one fixed square size (896 in Gemma 3); tiny models use a small one.
    image_size = {True: 896, False: 56}[is_real_size(shape)]
    patches_per_side = image_size // 14
    tokens_per_side = (
        16 if is_real_size(shape) else 2
    )  # the 4x4 average pool of Gemma 3 -> 256 tokens
    head_dim = shape.hidden // shape.heads
    config = Gemma3Config(
        text_config=text_config(
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
    return save_model(
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


def build_pixtral_family(
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
    ids = token_ids(tok, MISTRAL_SPECIALS)
    # Pixtral 12B: 16 px patches, no merge; Mistral 3: 14 px patches merged 2x2 into one token
    patch, merge = (16, 1) if family == "llava" else (14, 2)
    longest = 1024 if is_real_size(shape) else 112
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
    text = text_config(
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
            tie_word_embeddings=not is_real_size(shape),
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
            tie_word_embeddings=not is_real_size(shape),
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
    return save_model(model, processor, out, shape, [ids["</s>"]], ids["<pad>"], ids["<s>"])
