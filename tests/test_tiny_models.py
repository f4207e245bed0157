"""Every family's tiny random-weight model loads through the production path (Auto classes, offline),
renders its family's chat template, and runs a forward pass with a finite loss on a real image."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlm_ray.models.families import FAMILIES, family_of
from vlm_ray.models.tiny import BUILDERS, build_tiny_model
from vlm_ray.train.collator import masked_token_ids

TINY_FAMILIES = sorted(name for name, fam in FAMILIES.items() if fam.tiny)


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny_family_model(request: pytest.FixtureRequest, models_dir: Path) -> Path:
    """One tiny model per family, built once per session (build_tiny_model reuses a built folder)."""
    return build_tiny_model(models_dir / request.param, family=request.param, size="tiny")


@pytest.fixture(scope="session")
def loaded(tiny_family_model: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_family_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_family_model, dtype=torch.float32)
    return model.eval(), processor, family_of(tiny_family_model)


def _number_image(text: str, size: tuple[int, int] = (84, 56)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((8, size[1] // 2 - 6), text, fill="black")
    return img


CHAT = [
    {"role": "user", "content": [{"type": "text", "text": "Read the number."}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "417"}]},
]


def test_every_family_in_the_table_that_claims_a_tiny_model_has_a_builder():
    assert sorted(BUILDERS) == TINY_FAMILIES
    assert len(TINY_FAMILIES) == 7


def test_tiny_model_loads_offline_through_the_auto_classes(tiny_family_model: Path, loaded):
    model, processor, family = loaded
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(model).__name__ == family.model_class
    assert type(processor).__name__ == family.processor_class
    assert family.name in BUILDERS and (tiny_family_model / "config.json").exists()


def test_chat_template_renders_both_turns_between_the_response_markers(loaded):
    _, processor, family = loaded
    text = processor.apply_chat_template(CHAT, tokenize=False)
    # the instruction marker opens the user's turn, the response marker the assistant's answer
    user_at = text.index(family.instruction_part)
    answer_at = text.index(family.response_part, user_at + 1)
    assert user_at < text.index("Read the number.") < answer_at < text.index("417")
    assert family.image_token in text[user_at:answer_at]
    prompt = processor.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    # the generation prompt ends with the response marker: the model writes the answer next
    assert prompt.endswith(family.response_part)


def test_processor_and_forward_pass_give_a_finite_loss(loaded):
    model, processor, _ = loaded
    text = processor.apply_chat_template(CHAT, tokenize=False)
    batch = processor(
        text=[text],
        images=[[_number_image("417")]],
        return_tensors="pt",
        add_special_tokens=False,
    )
    labels = batch["input_ids"].clone()
    labels[torch.isin(labels, masked_token_ids(processor))] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


def test_a_tiny_model_has_under_half_a_million_parameters_so_cpu_tests_stay_fast(loaded):
    """Size, not a stopwatch: wall time on a shared 2-core runner is noise, the parameter count is not."""
    model, _, family = loaded
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 500_000, f"{family.name}'s tiny model has {n_params:,} parameters"


def test_generation_stops_on_the_family_stop_tokens(loaded):
    model, processor, family = loaded
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for stop in family.stop_tokens:
        assert tok.convert_tokens_to_ids(stop) in eos, f"{stop} must end generation"
    prompt = processor.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    batch = processor(
        text=[prompt], images=[[_number_image("9")]], return_tensors="pt", add_special_tokens=False
    )
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 3


def test_a_tiny_build_writes_a_few_megabytes_of_safetensors(tmp_path: Path):
    folder = build_tiny_model(tmp_path / "m", family="mllama", size="tiny")
    weights = list(folder.glob("*.safetensors"))
    assert weights, "the build writes its weights as safetensors"
    assert sum(f.stat().st_size for f in weights) < 4 * 2**20


def test_the_11b_mllama_shape_is_llama_3_2_11b_vision_to_the_parameter():
    """The benchmark's 11B shape has the real model's layout: checked by its exact size, on meta."""
    from transformers import MllamaForConditionalGeneration

    from vlm_ray.models.tiny import SHAPES
    from vlm_ray.models.tiny_llama_gemma_mistral import LLAMA_SPECIALS, mllama_config

    ids = {t: i for i, t in enumerate(LLAMA_SPECIALS)} | {"<|image|>": 128256}
    config = mllama_config(SHAPES["11b"], 128256, ids)  # the real vocabulary, image token last
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)

    assert sum(p.numel() for p in model.parameters()) == 10_670_220_835  # Llama-3.2-11B-Vision
    text, vision = config.text_config, config.vision_config
    assert text.num_hidden_layers == 40 and text.cross_attention_layers == [
        3,
        8,
        13,
        18,
        23,
        28,
        33,
        38,
    ]
    assert vision.num_global_layers == 8 and vision.vision_output_dim == 7680
