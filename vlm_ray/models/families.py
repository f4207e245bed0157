"""The one table of supported model families. Nothing else in the code branches on the family.

A family is found from the model's config.json `model_type`, so switching
family is changing `model.name` and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Family:
    """What the pipeline needs to know about one architecture."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class name (AutoModelForImageTextToText resolves it too)
    processor_class: str
    # train_on_responses_only: the text that opens a user turn and an assistant turn
    instruction_part: str
    response_part: str
    # LoRA targets: module-name fragments of the vision tower / language model,
    # and the attention / MLP projection names inside them
    vision_module_markers: tuple[str, ...]
    language_module_markers: tuple[str, ...]
    attention_modules: tuple[str, ...]
    mlp_modules: tuple[str, ...]
    # image geometry: sides are snapped to a multiple of this (patch * merge)
    patch_multiple: int
    max_aspect_ratio: float
    fixed_image_size: int | None = None  # families that resize every image to one square size
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
        vision_module_markers=("visual",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "attn.proj"),
        mlp_modules=("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp.0", "mlp.2"),
        patch_multiple=28,
        max_aspect_ratio=200.0,  # the Qwen2-VL image processor refuses ratios over 200
    ),
}


def family_by_name(name: str) -> Family:
    """Look a family up by its table name or any of its model_types."""
    for fam in FAMILIES.values():
        if name == fam.name or name in fam.model_types:
            return fam
    raise ValueError(f"unsupported model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")


def model_type_of(model_dir: str | Path) -> str:
    """The model_type in a local model folder's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg["model_type"]


def family_of(model_dir: str | Path) -> Family:
    """The family of a local model folder, from its config.json."""
    return family_by_name(model_type_of(model_dir))
