"""The trainer knobs both engines hand to TrainingArguments / SFTConfig come from spec.train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from vlm_ray.config import parse_spec
from vlm_ray.train.trainer_args import common_trainer_kwargs


def _kwargs(tmp_path: Path, **train) -> dict:
    spec = parse_spec({"model": {"name": "unused"}, "data": {"source": "unused"}, "train": train})
    return common_trainer_kwargs(spec, tmp_path / "out", bf16=False, fp16=False)


def test_every_kwarg_is_a_training_argument_and_the_spec_values_arrive(tmp_path):
    kwargs = _kwargs(
        tmp_path, per_device_train_batch_size=3, learning_rate=1e-4, optim="adamw_torch"
    )
    args = TrainingArguments(**kwargs)
    assert (args.per_device_train_batch_size, args.learning_rate) == (3, 1e-4)
    assert args.remove_unused_columns is False, "the collator needs messages and images"


def test_tf32_is_left_to_the_library_unless_set(tmp_path):
    assert "tf32" not in _kwargs(tmp_path)
    assert _kwargs(tmp_path, tf32=False)["tf32"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks workers without CUDA")
def test_tf32_on_a_worker_without_cuda_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train\.tf32: true needs an Ampere or newer CUDA GPU"):
        _kwargs(tmp_path, tf32=True)
