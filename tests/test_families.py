"""The family table: each entry names real transformers classes, its own chat template, and LoRA
names that make the four finetune_* switches pick exactly the vision / language × attention / MLP
layers of that family's model."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from vlm_ray.config import LoraSpec, load_spec
from vlm_ray.models.chat_templates import CHAT_TEMPLATES
from vlm_ray.models.families import FAMILIES, family_by_name, family_of
from vlm_ray.models.tiny import build_tiny_model
from vlm_ray.train.hf_engine import apply_lora

ROOT = Path(__file__).parent.parent
TINY = sorted(name for name, fam in FAMILIES.items() if fam.tiny)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_table_entry_names_real_transformers_classes(name: str):
    fam = FAMILIES[name]
    if fam.trust_remote_code:
        assert fam.model_class == "AutoModel" and not fam.tiny
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    for model_type in fam.model_types:
        # AutoModelForImageTextToText (what train and infer call) resolves to the table's class
        assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type] == fam.model_class
    assert hasattr(transformers, fam.processor_class)
    assert fam.instruction_part and fam.response_part and fam.image_token
    assert fam.name in CHAT_TEMPLATES and fam.image_token in CHAT_TEMPLATES[fam.name]


def test_family_lookup_by_model_type_and_unknown_names_list_the_supported_ones():
    assert family_by_name("qwen2_5_vl").title == "Qwen2.5-VL"
    assert family_by_name("deepseek_vl_v2").trust_remote_code
    with pytest.raises(ValueError, match=r"unsupported model family 'blip2'.*gemma3"):
        family_by_name("blip2")


def test_llava_with_a_clip_vision_tower_is_refused_naming_the_vision_config(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}})
    )
    with pytest.raises(ValueError, match=r"vision_config.model_type in \['pixtral'\]"):
        family_of(tmp_path)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_an_example_job_spec_that_validates(name: str):
    path = ROOT / "examples" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "vlm-ray" in text.splitlines()[1] + text.splitlines()[2]
    spec = load_spec(path, [])
    assert spec.model.trust_remote_code == FAMILIES[name].trust_remote_code


@pytest.fixture(scope="module", params=TINY)
def base_model(request: pytest.FixtureRequest, models_dir: Path):
    from transformers import AutoModelForImageTextToText

    path = build_tiny_model(models_dir / request.param, family=request.param, size="tiny")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return model, family_of(path)


def _adapted(base_model, **switches) -> set[str]:
    """Module names that got LoRA weights (only LoRA weights may be trainable)."""
    model, family = base_model
    peft_model = apply_lora(copy.deepcopy(model), LoraSpec(**switches), family)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    return {
        n.removeprefix("base_model.model.").split(".lora_A")[0] for n in trainable if "lora_A" in n
    }


def _only(vision: bool, attention: bool) -> dict[str, bool]:
    return dict(
        finetune_vision_layers=vision,
        finetune_language_layers=not vision,
        finetune_attention_modules=attention,
        finetune_mlp_modules=not attention,
    )


# Per family: a module each switch must reach (the family's own naming quirks).
MUST_REACH = {
    "qwen2_vl": ("visual.blocks.0.attn.qkv", "visual.merger.mlp.0"),
    "qwen2_5_vl": ("visual.blocks.0.attn.proj", "visual.blocks.0.mlp.gate_proj"),
    "qwen3_vl": ("visual.blocks.0.attn.qkv", "visual.deepstack_merger_list.0.linear_fc1"),
    "mllama": (
        "vision_model.global_transformer.layers.0.self_attn.q_proj",
        "vision_model.transformer.layers.0.mlp.fc1",
    ),
    "gemma3": (
        "vision_tower.encoder.layers.0.self_attn.out_proj",
        "vision_tower.encoder.layers.0.mlp.fc2",
    ),
    "llava": (
        "vision_tower.transformer.layers.0.attention.o_proj",
        "vision_tower.transformer.layers.0.feed_forward.gate_proj",
    ),
    "mistral3": (
        "vision_tower.transformer.layers.0.attention.q_proj",
        "vision_tower.transformer.layers.0.feed_forward.down_proj",
    ),
}


def test_the_four_switches_split_the_model_into_vision_language_attention_mlp(base_model):
    _, family = base_model
    groups = {
        (vision, attention): _adapted(base_model, **_only(vision, attention))
        for vision in (True, False)
        for attention in (True, False)
    }
    everything = _adapted(base_model)
    # each switch pair selects something, the four groups are disjoint, and together they are "all on"
    assert all(groups.values()), {k: len(v) for k, v in groups.items()}
    assert sum(len(g) for g in groups.values()) == len(everything)
    assert set().union(*groups.values()) == everything
    vision_re = "|".join(re.escape(m) for m in family.vision_module_markers)
    for (vision, _), names in groups.items():
        in_tower = {n for n in names if re.search(rf"(^|\.)({vision_re})\.", n)}
        assert in_tower == (names if vision else set())
    # language attention includes every self-attention (and Mllama's cross-attention) projection
    lang_attn = groups[(False, True)]
    assert {n.rsplit(".", 1)[1] for n in lang_attn} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {n.rsplit(".", 1)[1] for n in groups[(False, False)]} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    if family.name == "mllama":
        assert any(".cross_attn." in n for n in lang_attn)
    attn_name, mlp_name = MUST_REACH[family.name]
    assert any(n.endswith(attn_name) for n in groups[(True, True)]), attn_name
    assert any(n.endswith(mlp_name) for n in groups[(True, False)]), mlp_name


def test_turning_vision_off_leaves_every_vision_weight_frozen(base_model):
    model, family = base_model
    peft_model = apply_lora(copy.deepcopy(model), LoraSpec(finetune_vision_layers=False), family)
    vision_re = "|".join(re.escape(m) for m in family.vision_module_markers)
    vision_trainable = [
        n
        for n, p in peft_model.named_parameters()
        if p.requires_grad and re.search(rf"\.({vision_re})\.", n)
    ]
    assert vision_trainable == []


# Our own two-file model, standing in for DeepSeek-OCR's code (which is not available offline):
# it proves the gate and the remote-code loading path, not DeepSeek-OCR itself.
_REMOTE_CONFIG = """
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote_ocr"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
"""
_REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
"""


@pytest.fixture(scope="module")
def remote_code_snapshot(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A local snapshot whose config.json auto_map points at Python files inside it."""
    from transformers import AutoProcessor

    snap = tmp_path_factory.mktemp("remote_snapshot")
    (snap / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIG)
    (snap / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL)
    (snap / "config.json").write_text(
        json.dumps(
            {
                "model_type": "tiny_remote_ocr",
                "hidden_size": 8,
                "auto_map": {
                    "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                    "AutoModel": "modeling_tiny_remote.TinyRemoteModel",
                },
            }
        )
    )
    from transformers import AutoConfig, AutoModel

    # random weights, written by the snapshot's own class (save_pretrained keeps auto_map)
    config = AutoConfig.from_pretrained(snap, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(snap)
    qwen = build_tiny_model(models_dir / "qwen2_vl", family="qwen2_vl", size="tiny")
    AutoProcessor.from_pretrained(qwen).tokenizer.save_pretrained(snap)
    return snap


def test_remote_code_snapshot_is_refused_without_model_trust_remote_code(
    remote_code_snapshot: Path,
):
    from vlm_ray.models.remote_code import load_remote_code_model, uses_remote_code

    assert uses_remote_code(remote_code_snapshot)
    with pytest.raises(ValueError, match=r"auto_map.*set model.trust_remote_code=true"):
        load_remote_code_model(remote_code_snapshot, trust_remote_code=False)


def test_remote_code_snapshot_loads_its_own_classes_with_the_flag(remote_code_snapshot: Path):
    from vlm_ray.models.remote_code import load_remote_code_model

    model, tokenizer = load_remote_code_model(remote_code_snapshot, trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteModel"  # the class from the snapshot's own file
    assert model(torch.zeros(1, 8)).shape == (1, 8)
    assert tokenizer("Read").input_ids


def test_trust_remote_code_refuses_a_hub_id():
    from vlm_ray.models.remote_code import check_remote_code

    with pytest.raises(ValueError, match="must be a local or s3:// folder"):
        check_remote_code("deepseek-ai/DeepSeek-OCR", None, trust_remote_code=True)


def test_llama_vision_with_a_system_prompt_is_refused_before_prepare_reads_a_row(
    models_dir: Path,
):
    from vlm_ray.config import SpecError, parse_spec
    from vlm_ray.data.model_limits import model_limits

    mllama = build_tiny_model(models_dir / "mllama", family="mllama", size="tiny")

    def spec(**data):
        return parse_spec({"model": {"name": str(mllama)}, "data": {"source": "unused", **data}})

    assert model_limits(spec()).family == "mllama"
    with pytest.raises(SpecError, match=r"data\.system_prompt.*Llama 3\.2 Vision"):
        model_limits(spec(system_prompt="You read digits."))


def test_the_vision_tower_is_where_a_whole_name_component_is_a_vision_marker():
    qwen = family_by_name("qwen2_vl")
    assert qwen.in_vision_tower("model.visual.blocks.0")
    assert qwen.in_vision_tower("base_model.model.model.visual.blocks.3.mlp.fc1.lora_A.default")
    assert not qwen.in_vision_tower("model.language_model.layers.0")
    assert not qwen.in_vision_tower("model.visualizer.layers.0")  # a component, not a substring
    deepseek = family_by_name("deepseek_vl_v2")
    assert deepseek.in_vision_tower("model.sam_model.blocks.0")
