"""The job spec: examples load; every kind of bad value fails before anything starts, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_ray.config import JobSpec, SpecError, apply_overrides, describe_keys, load_spec, parse_spec

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
MINIMAL = {"model": {"name": "some/model"}, "data": {"source": "data.jsonl"}}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_spec_is_valid(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    assert spec.model.name


def test_defaults_follow_unsloth_notebook_values() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.lora.r == 16 and spec.lora.lora_alpha == 16 and spec.lora.random_state == 3407
    assert spec.lora.finetune_vision_layers and spec.lora.finetune_language_layers
    assert spec.train.train_on_responses_only is True
    assert (spec.data.image_min_size, spec.data.image_max_size) == (300, 1000)


@pytest.mark.parametrize(
    ("raw_patch", "field", "says"),
    [
        ({"model": {"name": "m", "lora_r": 8}}, "model.lora_r", "unknown key"),
        ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
        (
            {"data": {"source": "x", "format": "csv"}},
            "data.format",
            "'auto', 'hf', 'parquet', 'jsonl' or 'imagefolder'",
        ),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate", "valid number"),
        ({"lora": {"bias": "some"}}, "lora.bias", "'none', 'all' or 'lora_only'"),
        (
            {"data": {"source": "x", "heldout_fraction": 1.5}},
            "data.heldout_fraction",
            "less than 1",
        ),
        (
            {"model": {"name": "m", "load_in_4bit": True, "load_in_8bit": True}},
            "model",
            "at most one of load_in_4bit, load_in_8bit",
        ),
        ({"train": {"bf16": True, "fp16": True}}, "train", "bf16 and fp16 cannot both be true"),
        (
            {"generation": {"max_cache_len": 2048}},
            "generation",
            "max_cache_len applies to cache_implementation: static only",
        ),
        ({"infer": {"fp8": "e5m2"}}, "infer.fp8", "'off', 'vision' or 'all'"),
        ({"infer": {"fp8_scaling": "block"}}, "infer.fp8_scaling", "'row', 'tensor' or 'static'"),
        ({"infer": {"vision_attention": "flash3"}}, "infer.vision_attention", "'auto' or 'cudnn'"),
        ({"infer": {"job": "nov"}}, "infer.job", "set infer.source too"),
        ({"infer": {"source": "s3://b/x/", "job": "../up"}}, "infer.job", "should match pattern"),
        (
            {"data": {"source": "x", "image_min_size": 900, "image_max_size": 400}},
            "data",
            "image_min_size (900) is larger",
        ),
        (
            {"lora": {"finetune_vision_layers": False, "finetune_language_layers": False}},
            "lora",
            "nothing to train",
        ),
        ({"surprise": {}}, "surprise", "unknown key"),
    ],
)
def test_invalid_value_names_the_field_and_what_is_allowed(
    raw_patch: dict, field: str, says: str
) -> None:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in raw_patch.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "job.yaml")
    message = str(err.value)
    assert f"  {field}:" in message
    assert says in message


def test_missing_required_field_is_named() -> None:
    with pytest.raises(SpecError, match=r"model\.name: required"):
        parse_spec({"model": {}, "data": {"source": "x"}})


def test_overrides_are_typed_by_yaml() -> None:
    raw = apply_overrides(
        {"model": {"name": "m"}, "data": {"source": "s"}},
        ["lora.r=8", "train.bf16=true", "lora.target_modules=[q_proj, v_proj]", "run.uri=s3://b/p"],
    )
    spec = parse_spec(raw)
    assert spec.lora.r == 8 and spec.train.bf16 is True
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.run.uri == "s3://b/p"


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"dotted\.key=value"):
        apply_overrides({}, ["lora.r"])


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping of sections"):
        load_spec(bad)


def test_help_table_lists_every_unsloth_knob() -> None:
    keys = {k for k, _, _ in describe_keys()}
    for knob in (
        "model.name",
        "model.max_seq_length",
        "model.load_in_4bit",
        "model.load_in_8bit",
        "model.load_in_16bit",
        "model.full_finetuning",
        "model.use_gradient_checkpointing",
        "model.offload_embedding",
        "lora.finetune_vision_layers",
        "lora.finetune_language_layers",
        "lora.finetune_attention_modules",
        "lora.finetune_mlp_modules",
        "lora.r",
        "lora.lora_alpha",
        "lora.lora_dropout",
        "lora.bias",
        "lora.use_rslora",
        "lora.loftq_config",
        "lora.random_state",
        "lora.target_modules",
        "train.train_on_responses_only",
        "train.per_device_train_batch_size",
        "train.gradient_accumulation_steps",
        "train.learning_rate",
        "train.num_train_epochs",
        "train.max_steps",
        "train.warmup_steps",
        "train.optim",
        "train.weight_decay",
        "train.lr_scheduler_type",
        "train.seed",
        "train.bf16",
        "train.fp16",
        "train.logging_steps",
        "train.save_steps",
        "generation.max_new_tokens",
        "generation.temperature",
        "generation.min_p",
        "generation.do_sample",
        "generation.batch_size",
        "data.source",
        "data.format",
        "data.image_column",
        "data.text_column",
        "data.prompt",
        "data.system_prompt",
        "data.heldout_fraction",
        "run.uri",
        "run.s3_endpoint_url",
        "ray.address",
        "ray.num_cpus_per_task",
        "ray.num_gpus_per_worker",
        "ray.pool_size",
    ):
        assert knob in keys, knob
