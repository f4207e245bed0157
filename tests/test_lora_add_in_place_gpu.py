"""train.lora_add_in_place through Unsloth's patched PEFT forward on a GPU: the train stage adds
LoRA's products in place and trains as Unsloth's own out-of-place add does. Skipped where Unsloth
is not installed (docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_the_unsloth_train_stage_adds_lora_in_place_and_trains_the_same(
    tiny_qwen2_vl: Path, logged_training_run: Callable
) -> None:
    pytest.importorskip("unsloth")
    train = {"engine": "unsloth", "max_steps": 3, "per_device_train_batch_size": 2}
    copied, copied_losses = logged_training_run(
        tiny_qwen2_vl, "copied", 8, {**train, "lora_add_in_place": False}
    )
    in_place, in_place_losses = logged_training_run(tiny_qwen2_vl, "in_place", 8, train)

    assert "lora_add_in_place" not in copied
    counts = in_place["lora_add_in_place"]
    # every LoRA layer's forward in eager code; the compiled blocks keep Unsloth's add
    assert counts["in_place"] > 0, counts
    assert len(in_place_losses) == len(copied_losses) == 3
    assert in_place_losses == pytest.approx(copied_losses, rel=1e-3)
