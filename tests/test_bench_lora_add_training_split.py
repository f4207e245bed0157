"""bench/lora_add_training_split.py trains a tiny Qwen2-VL a few steps with Unsloth's LoRA add and
with train.lora_add_without_copy's, and compares the losses and trained LoRA B tensors with eager
Unsloth's and with float32's.
Eager (the CPU test; the compiled ways take ~30 s on 2 cores), ours is Unsloth's add exactly: the
language model's 3-D outputs take Unsloth's add, the vision tower's 2-D ones the same cuBLAS/CPU
addmm in place, so the losses and every B tensor agree to the bit."""

from __future__ import annotations

import json

from peft.tuners.lora.layer import Linear as LoraLinear

from bench.lora_add_training_split import main


def test_eager_training_with_our_add_is_unsloths_to_the_bit(tmp_path):
    out = tmp_path / "rows.jsonl"
    peft_forward = LoraLinear.forward

    rows = main(
        [
            *("--device", "cpu", "--steps", "3", "--ways", "unsloth_eager", "ours_eager"),
            *("--seeds", "0", "1"),
            *("--model-dir", str(tmp_path / "model"), "--out", str(out)),
        ]
    )

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert LoraLinear.forward is peft_forward  # PEFT's own again: the rest of the suite uses it
    # the float32 reference always runs; every way once per seed
    assert [(r["seed"], r["way"]) for r in rows] == [
        (seed, way) for seed in (0, 1) for way in ("fp32_eager", "unsloth_eager", "ours_eager")
    ]
    first, second = rows[:3], rows[3:]
    assert first[0]["losses"] != second[0]["losses"]  # another seed, other weights and images
    for fp32, unsloth, ours in (first, second):
        assert len(ours["losses"]) == 3
        assert fp32["first_loss_off_fp32"] == fp32["mean_loss_off_fp32"] == 0.0
        assert 0 < unsloth["first_loss_off_fp32"] < 0.01  # bf16 rounding, no more
        assert 0 < unsloth["mean_loss_off_fp32"] < 0.05
        assert ours["losses"][0] != ours["losses"][-1]  # it trains: the loss moves
        assert ours["losses"] == unsloth["losses"]
        assert ours["min_cos_to_unsloth_eager"] == 1.0


def test_compiled_our_add_keeps_what_bf16_rounding_loses_and_only_that(tmp_path):
    """Run 28's reading of its 7B split, on CPU: compiled, ours trains nearer float32 than bf16
    eager does, because Inductor fuses our add into its consumer and rounds the fused chain
    once; told to round every bf16 intermediate as eager code does, ours is eager's again."""

    def ours_compiled(*emulate: str) -> tuple[dict, dict, dict]:
        rows = main(
            [
                *("--device", "cpu", "--steps", "2", "--ways", "ours_compiled", *emulate),
                *("--model-dir", str(tmp_path / "model")),
            ]
        )
        return tuple(rows)  # float32, eager Unsloth, ours compiled

    fp32, eager, ours = ours_compiled()
    # the second step's loss is the first that LoRA's update moves
    assert abs(ours["losses"][1] - fp32["losses"][1]) < abs(eager["losses"][1] - fp32["losses"][1])

    fp32, eager, ours = ours_compiled("--emulate-precision-casts")
    assert ours["emulate_precision_casts"] is True
    assert abs(ours["losses"][1] - eager["losses"][1]) < 1e-3
    assert abs(ours["losses"][1] - fp32["losses"][1]) > abs(ours["losses"][1] - eager["losses"][1])
