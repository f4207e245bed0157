"""bench/lora_add_training_split.py trains a tiny Qwen2-VL a few steps with Unsloth's LoRA add and
with train.lora_add_without_copy's, and compares the losses and trained LoRA B tensors with eager
Unsloth's and with float32's.
Eager (the CPU test; the compiled ways take ~30 s on 2 cores), ours is Unsloth's add exactly: the
language model's 3-D outputs take Unsloth's add, the vision tower's 2-D ones the same cuBLAS/CPU
addmm in place, so the losses and every B tensor agree to the bit."""

from __future__ import annotations

import json

from bench.lora_add_training_split import main


def test_eager_training_with_our_add_is_unsloths_to_the_bit(tmp_path):
    out = tmp_path / "rows.jsonl"

    rows = main(
        [
            *("--device", "cpu", "--steps", "3", "--ways", "unsloth_eager", "ours_eager"),
            *("--model-dir", str(tmp_path / "model"), "--out", str(out)),
        ]
    )

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    fp32, unsloth, ours = rows  # the float32 reference always runs
    assert [r["way"] for r in rows] == ["fp32_eager", "unsloth_eager", "ours_eager"]
    assert len(ours["losses"]) == 3
    assert fp32["first_loss_off_fp32"] == 0.0
    assert 0 < unsloth["first_loss_off_fp32"] < 0.01  # bf16 rounding, no more
    assert ours["losses"][0] != ours["losses"][-1]  # it trains: the loss moves
    assert ours["losses"] == unsloth["losses"]
    assert ours["min_cos_to_unsloth_eager"] == 1.0
