"""train.lora_add_without_copy through Unsloth's patched PEFT forward on a GPU: the train stage adds
LoRA's products in place in eager code and as fusable adds in compiled code, and trains as
Unsloth's own out-of-place add does. Skipped where Unsloth is not installed (docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_the_unsloth_train_stage_adds_lora_without_a_copy_and_trains_the_same(
    tiny_qwen2_vl: Path, logged_training_run: Callable
) -> None:
    pytest.importorskip("unsloth")
    train = {"engine": "unsloth", "max_steps": 3, "per_device_train_batch_size": 2}
    copied, copied_losses = logged_training_run(tiny_qwen2_vl, "copied", 8, train)
    without, without_losses = logged_training_run(
        tiny_qwen2_vl, "without_copy", 8, {**train, "lora_add_without_copy": True}
    )

    assert "lora_add_without_copy" not in copied
    counts = without["lora_add_without_copy"]
    # the LoRA layers that Unsloth's compiled blocks leave eager add in place
    assert counts["in_place"] > 0, counts
    assert len(without_losses) == len(copied_losses) == 3
    assert without_losses == pytest.approx(copied_losses, rel=1e-3)
