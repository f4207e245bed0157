"""Which modules get LoRA adapters: the four finetune_* switches over the family table, or an explicit list."""

from __future__ import annotations

import re
from typing import Any

import torch

from vlm_ray.config import LoraSpec
from vlm_ray.models.families import Family


def lora_target_regex(lora: LoraSpec, family: Family) -> str:
    """A regex (PEFT fullmatch) over module names: (vision|language marker) ... (attention|mlp name)."""
    parts: list[str] = []
    if lora.finetune_vision_layers:
        parts += family.vision_module_markers
    if lora.finetune_language_layers:
        parts += family.language_module_markers
    names: list[str] = []
    if lora.finetune_attention_modules:
        names += family.attention_modules
    if lora.finetune_mlp_modules:
        names += family.mlp_modules
    # A marker is a whole dotted component ("visual" in model.visual.blocks.0...), and the
    # projection name is the module's tail ("attn.proj", "q_proj", "mlp.0" for the merger).
    part_re = "|".join(re.escape(p) for p in parts)
    name_re = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?(?:{part_re})\.(?:.*\.)?(?:{name_re})"


def lora_target_modules(model: Any, lora: LoraSpec, family: Family) -> str | list[str]:
    """LoraConfig.target_modules for this model: lora.target_modules if set, else the switches' regex.

    The regex is checked against the model's own Linear layers so a switch
    combination that selects nothing fails here, naming the switches.
    """
    if lora.target_modules is not None:
        return lora.target_modules
    pattern = lora_target_regex(lora, family)
    matched = [
        name
        for name, module in model.named_modules()
        if re.fullmatch(pattern, name) and isinstance(module, torch.nn.Linear)
    ]
    if not matched:
        raise ValueError(
            f"lora.finetune_vision_layers={lora.finetune_vision_layers}, "
            f"finetune_language_layers={lora.finetune_language_layers}, "
            f"finetune_attention_modules={lora.finetune_attention_modules}, "
            f"finetune_mlp_modules={lora.finetune_mlp_modules} select no Linear layer of this "
            f"{family.name} model; turn another switch on or set lora.target_modules"
        )
    not_linear = [
        name
        for name, module in model.named_modules()
        if re.fullmatch(pattern, name) and not isinstance(module, torch.nn.Linear)
    ]
    if not_linear:
        # PEFT would fail on these with a less helpful message; the family table is wrong.
        raise ValueError(
            f"family {family.name}: LoRA target names also match non-Linear modules {not_linear[:3]}; "
            "fix attention_modules / mlp_modules in vlm_ray/models/families.py"
        )
    return pattern
