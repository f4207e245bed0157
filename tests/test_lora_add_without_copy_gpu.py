"""train.lora_add_without_copy through Unsloth's patched PEFT forward on a GPU: the train stage adds
LoRA's products in place in eager code and as fusable adds in compiled code, and trains as
Unsloth's own out-of-place add does: the same losses and the same adapter. Skipped where Unsloth
is not installed (docs/gpu.md).

Why the adapter too: at this size a loss moves ~1e-3 per step, so losses alone would pass even
if a layer's gradients were wrong. The first step's gradient reaches only LoRA's B (A's product
meets B = 0), and AdamW's first update is about lr times its sign, so the two runs' B tensors
agree element for element unless the gradients' signs do not; run 27 (7B, batch 32) trained to
a different loss with the switch, from the second step on (docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def adapter_tensors(store_root: Path) -> dict:
    """The trained adapter's tensors, as the train stage saved them."""
    from safetensors.torch import load_file

    from vlm_ray import layout
    from vlm_ray.storage import LocalStore

    adapter = LocalStore(store_root).local_path(layout.ADAPTER)
    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def test_the_unsloth_train_stage_adds_lora_without_a_copy_and_trains_the_same(
    tiny_qwen2_vl: Path, logged_training_run: Callable, tmp_path: Path
) -> None:
    pytest.importorskip("unsloth")
    import torch

    train = {"engine": "unsloth", "max_steps": 3, "per_device_train_batch_size": 2}
    copied, copied_losses = logged_training_run(
        tiny_qwen2_vl, "copied", 8, {**train, "lora_add_without_copy": False}
    )
    without, without_losses = logged_training_run(
        tiny_qwen2_vl, "without_copy", 8, {**train, "lora_add_without_copy": True}
    )

    assert "lora_add_without_copy" not in copied
    counts = without["lora_add_without_copy"]
    # the LoRA layers that Unsloth's compiled blocks leave eager add in place
    assert counts["in_place"] > 0, counts
    assert len(without_losses) == len(copied_losses) == 3
    assert without_losses == pytest.approx(copied_losses, rel=1e-3)

    want, got = adapter_tensors(tmp_path / "copied"), adapter_tensors(tmp_path / "without_copy")
    assert want.keys() == got.keys()
    lora_b = [name for name in want if "lora_B" in name]
    assert lora_b
    for name in lora_b:
        w, g = want[name].float().flatten(), got[name].float().flatten()
        assert w.abs().max() > 0, name  # trained: B moved from zero
        # Adam's sign-like steps: a few elements with near-zero gradients may differ, a layer
        # whose gradients are wrong would not come close
        cosine = torch.nn.functional.cosine_similarity(w, g, dim=0).item()
        assert cosine > 0.9, (name, cosine)
