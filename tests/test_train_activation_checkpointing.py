"""Activation checkpointing: model.use_gradient_checkpointing and train.checkpoint_every_n_layers
reach the Trainer, and the run says how many layers ended up checkpointed."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from vlm_ray.config import parse_spec
from vlm_ray.storage import LocalStore
from vlm_ray.train.activation_checkpointing import trainer_checkpointing_kwargs
from vlm_ray.train.settings_guard import training_settings
from vlm_ray.train.unsloth_engine import sft_config

TRAIN = {
    "engine": "hf",
    "per_device_train_batch_size": 2,
    "max_steps": 2,
    "save_steps": 100,
    "warmup_steps": 0,
}


def _spec(gc, every=1):
    return parse_spec(
        {
            "model": {"name": "unused", "use_gradient_checkpointing": gc},
            "data": {"source": "unused"},
            # fp32: SFTConfig refuses bf16/fp16 on a machine without a GPU
            "train": {"checkpoint_every_n_layers": every, "bf16": False, "fp16": False},
        }
    )


def test_false_reaches_trl_whose_sft_config_would_otherwise_checkpoint_anyway(tmp_path):
    # TRL's SFTConfig defaults gradient_checkpointing to true: "false" has to be said to it.
    assert sft_config(_spec("unsloth"), tmp_path, bf16_supported=False).gradient_checkpointing
    assert not sft_config(_spec(False), tmp_path, bf16_supported=False).gradient_checkpointing


def test_every_n_layers_goes_to_the_trainer_only_when_checkpointing_is_on():
    assert trainer_checkpointing_kwargs(_spec(True, every=3)) == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"every_n_layers": 3},
    }
    assert trainer_checkpointing_kwargs(_spec(False, every=3)) == {
        "gradient_checkpointing": False,
        "gradient_checkpointing_kwargs": None,
    }
    # the Unsloth engine leaves torch's checkpoint arguments to TRL and Unsloth, as the notebooks do
    assert trainer_checkpointing_kwargs(_spec("unsloth"))["gradient_checkpointing_kwargs"] is None


def test_which_layers_are_checkpointed_is_not_a_training_setting(tmp_path):
    store = LocalStore(tmp_path / "run")
    assert training_settings(_spec(True), store) == training_settings(_spec(True, every=2), store)
    assert training_settings(_spec(True), store) != training_settings(_spec(False), store)


@pytest.fixture
def train_with(tiny_training_run):
    """train_with(use_gradient_checkpointing, **train knobs) -> the result of 2 CPU steps."""

    def run(gc, **train):
        _, result = tiny_training_run(4, {**TRAIN, **train}, {"use_gradient_checkpointing": gc})
        return result

    return run


@pytest.mark.parametrize(
    ("gc", "every", "scope", "expected"),
    [
        (True, 1, "all", "all"),
        (True, 2, "all", "half"),
        (False, 1, "all", "none"),
        (True, 1, "vision", "vision"),
        (True, 1, "language", "language"),
    ],
    ids=["every-layer", "every-2nd-layer", "off", "vision-only", "language-only"],
)
def test_the_run_reports_how_many_layers_were_checkpointed(
    train_with, tiny_qwen2_vl, gc, every, scope, expected
):
    result = train_with(gc, checkpoint_every_n_layers=every, checkpoint_scope=scope)

    done, total = map(int, result["checkpointed_layers"].split("/"))
    config = AutoConfig.from_pretrained(tiny_qwen2_vl)
    vision, language = config.vision_config.depth, config.text_config.num_hidden_layers
    assert total == vision + language
    want = {
        "all": total,
        # every_n_layers counts across the whole model (vision blocks, then decoder layers)
        "half": (total + 1) // 2,
        "none": 0,
        "vision": vision,
        "language": language,
    }[expected]
    assert done == want
    assert result["global_step"] == 2


def test_a_scope_without_checkpointing_says_it_has_no_effect(train_with, caplog):
    with caplog.at_level("WARNING", logger="vlm_ray.train.activation_checkpointing"):
        result = train_with(False, checkpoint_scope="vision")

    assert result["checkpointed_layers"].startswith("0/")
    assert "train.checkpoint_scope: vision has no effect" in caplog.text
