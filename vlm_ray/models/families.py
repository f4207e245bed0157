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
    # what a person reads in docs/models.md: the family's name and checkpoints of it on the hub
    title: str = ""
    hub_ids: tuple[str, ...] = ()
    # the vision tower's model_type where one model_type covers several architectures (llava)
    vision_model_types: tuple[str, ...] = ()
    image_token: str = ""  # the placeholder the chat template writes where the image goes
    # generation: the tokens that end an answer (beside the tokenizer's eos)
    stop_tokens: tuple[str, ...] = ()
    system_prompt_with_images: bool = (
        True  # Llama 3.2 Vision's template refuses a system turn with an image
    )
    trust_remote_code: bool = (
        False  # needs model.trust_remote_code=true (code shipped with the weights)
    )
    tiny: bool = True  # vlm_ray.models.tiny builds a random-weight model of it

    def in_vision_tower(self, module_name: str) -> bool:
        """Whether a module (or parameter) name lies in the vision tower: one of its dotted
        components is a vision_module_marker."""
        return not set(self.vision_module_markers).isdisjoint(module_name.split("."))


_QWEN_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "attn.proj")
_LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")

# Markers are whole dotted components of module names; attention / MLP names are the module's
# tail. Multimodal projectors outside the vision tower (Llava, Mistral 3, Mllama) match neither,
# as with Unsloth's finetune_* switches: they train only with full fine-tuning or target_modules.
FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        name="qwen2_vl",
        title="Qwen2-VL",
        hub_ids=(
            "Qwen/Qwen2-VL-2B-Instruct",
            "Qwen/Qwen2-VL-7B-Instruct",
            "unsloth/Qwen2-VL-7B-Instruct",
        ),
        model_types=("qwen2_vl",),
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
        vision_module_markers=("visual",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=_QWEN_ATTENTION,
        mlp_modules=("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp.0", "mlp.2"),
        patch_multiple=28,
        max_aspect_ratio=200.0,  # the Qwen2-VL image processor refuses ratios over 200
        image_token="<|image_pad|>",
        stop_tokens=("<|im_end|>",),
        notes="Dynamic resolution: 14 px patches merged 2x2, so sides snap to 28 px; "
        "the template adds a default system turn.",
    ),
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        title="Qwen2.5-VL",
        hub_ids=(
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "unsloth/Qwen2.5-VL-7B-Instruct",
        ),
        model_types=("qwen2_5_vl",),
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
        vision_module_markers=("visual",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=_QWEN_ATTENTION,
        # the vision blocks' MLP is gated (gate/up/down) in 2.5; the merger is mlp.0 / mlp.2
        mlp_modules=("gate_proj", "up_proj", "down_proj", "mlp.0", "mlp.2"),
        patch_multiple=28,
        max_aspect_ratio=200.0,
        image_token="<|image_pad|>",
        stop_tokens=("<|im_end|>",),
        notes="Same template and image rules as Qwen2-VL; window attention in the vision tower.",
    ),
    "qwen3_vl": Family(
        name="qwen3_vl",
        title="Qwen3-VL",
        hub_ids=(
            "Qwen/Qwen3-VL-2B-Instruct",
            "Qwen/Qwen3-VL-8B-Instruct",
            "unsloth/Qwen3-VL-8B-Instruct",
        ),
        model_types=("qwen3_vl",),
        model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
        vision_module_markers=("visual",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=_QWEN_ATTENTION,
        # blocks, merger and the DeepStack mergers all use linear_fc1 / linear_fc2
        mlp_modules=("gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2"),
        patch_multiple=32,  # 16 px patches merged 2x2
        max_aspect_ratio=200.0,
        image_token="<|image_pad|>",
        stop_tokens=("<|im_end|>",),
        notes="16 px patches (sides snap to 32 px); no default system turn; "
        "DeepStack feeds several vision layers into the LM.",
    ),
    "mllama": Family(
        name="mllama",
        title="Llama 3.2 Vision",
        hub_ids=(
            "meta-llama/Llama-3.2-11B-Vision-Instruct",
            "unsloth/Llama-3.2-11B-Vision-Instruct",
        ),
        model_types=("mllama",),
        model_class="MllamaForConditionalGeneration",
        processor_class="MllamaProcessor",
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        vision_module_markers=("vision_model",),
        language_module_markers=("language_model", "lm_head"),
        # self_attn and cross_attn (the image cross-attention layers) both name q/k/v/o_proj
        attention_modules=_LLAMA_ATTENTION,
        mlp_modules=(*_LLAMA_MLP, "fc1", "fc2"),
        patch_multiple=14,
        max_aspect_ratio=200.0,  # any ratio fits into up to 4 tiles of 560 px (padded)
        fixed_image_size=560,
        image_token="<|image|>",
        stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        system_prompt_with_images=False,
        notes="Images enter through cross-attention layers, as 1-4 tiles of 560 px; one <|image|> "
        "token per image. The template refuses a system turn next to an image and adds a dated "
        "system header when there is no image.",
    ),
    "gemma3": Family(
        name="gemma3",
        title="Gemma 3",
        hub_ids=("google/gemma-3-4b-it", "google/gemma-3-12b-it", "unsloth/gemma-3-4b-it"),
        model_types=("gemma3",),
        model_class="Gemma3ForConditionalGeneration",
        processor_class="Gemma3Processor",
        instruction_part="<start_of_turn>user\n",
        response_part="<start_of_turn>model\n",
        vision_module_markers=("vision_tower",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=(*_LLAMA_ATTENTION, "out_proj"),
        mlp_modules=(*_LLAMA_MLP, "fc1", "fc2"),
        patch_multiple=14,
        # no hard limit, but every image is squashed to one square: long text lines lose detail
        max_aspect_ratio=200.0,
        fixed_image_size=896,
        image_token="<start_of_image>",
        stop_tokens=("<end_of_turn>", "<eos>"),
        notes="SigLIP at a fixed 896x896 (tiny models: 56x56), 256 soft tokens per image; the "
        "assistant role is 'model'; a system turn is folded into the first user turn.",
    ),
    "llava": Family(
        name="llava",
        title="Pixtral (Llava + Pixtral vision)",
        hub_ids=("mistral-community/pixtral-12b", "unsloth/Pixtral-12B-2409"),
        model_types=("llava",),
        vision_model_types=("pixtral",),
        model_class="LlavaForConditionalGeneration",
        processor_class="PixtralProcessor",
        instruction_part="[INST]",
        response_part="[/INST]",
        vision_module_markers=("vision_tower",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=_LLAMA_ATTENTION,
        mlp_modules=_LLAMA_MLP,
        patch_multiple=16,
        max_aspect_ratio=200.0,
        image_token="[IMG]",
        stop_tokens=("</s>",),
        notes="Native resolution up to 1024 px, 16 px patches, one [IMG] per patch and [IMG_BREAK] "
        "per row; the template puts a system turn into the last user turn.",
    ),
    "mistral3": Family(
        name="mistral3",
        title="Mistral 3 / Ministral VL",
        hub_ids=(
            "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
            "unsloth/Mistral-Small-3.2-24B-Instruct-2506",
        ),
        model_types=("mistral3",),
        model_class="Mistral3ForConditionalGeneration",
        processor_class="PixtralProcessor",
        instruction_part="[INST]",
        response_part="[/INST]",
        vision_module_markers=("vision_tower",),
        language_module_markers=("language_model", "lm_head"),
        attention_modules=_LLAMA_ATTENTION,
        mlp_modules=_LLAMA_MLP,
        patch_multiple=28,  # 14 px patches merged 2x2
        max_aspect_ratio=200.0,
        image_token="[IMG]",
        stop_tokens=("</s>",),
        notes="Pixtral vision with 14 px patches merged 2x2 (sides snap to 28 px); the template "
        "always writes a [SYSTEM_PROMPT] block (a default one when the chat has none).",
    ),
    "deepseek_ocr": Family(
        name="deepseek_ocr",
        title="DeepSeek-OCR (remote code)",
        hub_ids=("deepseek-ai/DeepSeek-OCR", "unsloth/DeepSeek-OCR"),
        model_types=("deepseek_vl_v2",),
        model_class="AutoModel",  # DeepseekOCRForCausalLM from the snapshot's own code
        processor_class="AutoTokenizer",  # its image preprocessing lives in the model's code
        instruction_part="<|User|>",
        response_part="<|Assistant|>",
        vision_module_markers=("sam_model", "vision_model"),
        language_module_markers=("model.layers", "lm_head"),
        attention_modules=_LLAMA_ATTENTION,
        mlp_modules=_LLAMA_MLP,
        patch_multiple=16,
        max_aspect_ratio=200.0,
        fixed_image_size=1024,
        image_token="<image>",
        trust_remote_code=True,
        tiny=False,
        notes="Code ships with the weights: load a local snapshot with model.trust_remote_code=true. "
        "Not testable here (no snapshot of its code offline).",
    ),
}


def family_by_name(name: str) -> Family:
    """Look a family up by its table name or any of its model_types."""
    for fam in FAMILIES.values():
        if name == fam.name or name in fam.model_types:
            return fam
    raise ValueError(f"unsupported model family {name!r}; supported: {', '.join(sorted(FAMILIES))}")


def family_of(model_dir: str | Path) -> Family:
    """The family of a local model folder, from its config.json (and its vision tower where that matters)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fam = family_by_name(cfg["model_type"])
    vision = (cfg.get("vision_config") or {}).get("model_type")
    if fam.vision_model_types and vision not in fam.vision_model_types:
        raise ValueError(
            f"{model_dir}/config.json: model_type {cfg['model_type']!r} with a {vision!r} vision tower is "
            f"not supported; {fam.title} needs vision_config.model_type in {list(fam.vision_model_types)}"
        )
    return fam
