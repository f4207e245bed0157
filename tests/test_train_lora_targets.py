"""The four finetune_* switches decide which weights get LoRA adapters; target_modules overrides them;
full fine-tuning trains every weight."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vlm_ray.config import LoraSpec, parse_spec
from vlm_ray.models.families import family_of
from vlm_ray.train.hf_engine import apply_lora, load_hf_model


@pytest.fixture(scope="module")
def base_model(tiny_qwen2_vl: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)


def _adapted(base_model, tiny_qwen2_vl: Path, **lora) -> set[str]:
    """Names of the modules that got a LoRA adapter (from the trainable lora_A weights)."""
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(**lora), family_of(tiny_qwen2_vl))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), "only LoRA weights train"
    return {
        n.removeprefix("base_model.model.").split(".lora_A")[0] for n in trainable if ".lora_A" in n
    }


VISION_ATTN = {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj"}
VISION_MLP = {
    "model.visual.blocks.0.mlp.fc1",
    "model.visual.blocks.0.mlp.fc2",
    "model.visual.merger.mlp.0",
    "model.visual.merger.mlp.2",
}
LANG_ATTN = {f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
LANG_MLP = {
    f"model.language_model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")
}


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ({}, VISION_ATTN | VISION_MLP | LANG_ATTN | LANG_MLP),
        ({"finetune_vision_layers": False}, LANG_ATTN | LANG_MLP),
        ({"finetune_language_layers": False}, VISION_ATTN | VISION_MLP),
        ({"finetune_mlp_modules": False}, VISION_ATTN | LANG_ATTN),
        ({"finetune_attention_modules": False}, VISION_MLP | LANG_MLP),
        ({"finetune_vision_layers": False, "finetune_mlp_modules": False}, LANG_ATTN),
    ],
    ids=["all", "no-vision", "no-language", "no-mlp", "no-attention", "language-attention"],
)
def test_finetune_switches_decide_which_layers_get_adapters(
    base_model, tiny_qwen2_vl, switches, expected
):
    assert _adapted(base_model, tiny_qwen2_vl, **switches) == expected


def test_explicit_target_modules_override_the_switches(base_model, tiny_qwen2_vl):
    adapted = _adapted(
        base_model, tiny_qwen2_vl, target_modules=["q_proj"], finetune_language_layers=False
    )
    assert adapted == {f"model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1)}


def test_adapter_init_is_seeded_by_random_state(base_model, tiny_qwen2_vl):
    family = family_of(tiny_qwen2_vl)

    def lora_a(seed: int) -> torch.Tensor:
        model = apply_lora(copy.deepcopy(base_model), LoraSpec(random_state=seed), family)
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_rank_alpha_rslora_and_dropout_reach_the_adapter(base_model, tiny_qwen2_vl):
    lora = LoraSpec(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, bias="lora_only")
    model = apply_lora(copy.deepcopy(base_model), lora, family_of(tiny_qwen2_vl))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.bias) == (
        4,
        8,
        0.1,
        True,
        "lora_only",
    )
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rank-stabilised: alpha/sqrt(r)


def test_full_finetuning_trains_every_weight_without_an_adapter(tiny_qwen2_vl):
    spec = parse_spec(
        {"model": {"name": str(tiny_qwen2_vl), "full_finetuning": True}, "data": {"source": "x"}}
    )
    model, _, precision = load_hf_model(spec, str(tiny_qwen2_vl), family_of(tiny_qwen2_vl))
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "fp32" in precision
